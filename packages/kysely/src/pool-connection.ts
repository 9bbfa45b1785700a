/**
 * The connection `scopedKysely` hands Kysely outside any scope, with
 * `outsideScope: 'pool'`: a pooled connection, as plain Kysely would use,
 * except that it is never leaked when BEGIN, COMMIT or ROLLBACK throws.
 *
 * Kysely's `ControlledTransaction.commit()` releases its connection only after
 * a successful COMMIT (kysely-org/kysely#1990): a failing COMMIT keeps it
 * checked out for good. Here a failed BEGIN/COMMIT/ROLLBACK hands the
 * connection back at once (rolled back, or destroyed when it is broken), and
 * the calls Kysely may still make on it become no-ops.
 */
import type {
  CompiledQuery,
  DatabaseConnection,
  Log,
  QueryCompiler,
  QueryResult,
  TransactionSettings,
} from 'kysely'
import type { KyselyDriver } from './kysely-driver.js'
import { logged, loggedStream } from './query-log.js'
import type { RoutedConnection } from './routed-connection.js'

export class PoolConnection implements RoutedConnection {
  #driver: KyselyDriver
  /** undefined once handed back to the pool. */
  #conn: DatabaseConnection | undefined
  /** A connection-level error seen on it: destroyed, not reused, at release. */
  #broken: unknown
  #log: Log | undefined

  constructor(driver: KyselyDriver, conn: DatabaseConnection, log: Log | undefined) {
    this.#driver = driver
    this.#conn = conn
    this.#log = log
  }

  executeQuery<R>(compiledQuery: CompiledQuery): Promise<QueryResult<R>> {
    const run = () => this.#execute<R>(compiledQuery)
    return this.#log ? logged(this.#log, compiledQuery, run) : run()
  }

  streamQuery<R>(
    compiledQuery: CompiledQuery,
    chunkSize?: number,
  ): AsyncIterableIterator<QueryResult<R>> {
    const stream = this.#stream<R>(compiledQuery, chunkSize)
    return this.#log ? loggedStream(this.#log, compiledQuery, stream) : stream
  }

  async #execute<R>(compiledQuery: CompiledQuery): Promise<QueryResult<R>> {
    const conn = this.#live()
    try {
      return await conn.executeQuery<R>(compiledQuery)
    } catch (e) {
      this.#note(conn, e)
      throw e
    }
  }

  async *#stream<R>(
    compiledQuery: CompiledQuery,
    chunkSize?: number,
  ): AsyncIterableIterator<QueryResult<R>> {
    const conn = this.#live()
    try {
      yield* conn.streamQuery<R>(compiledQuery, chunkSize)
    } catch (e) {
      this.#note(conn, e)
      throw e
    }
  }

  async begin(settings: TransactionSettings): Promise<void> {
    const conn = this.#live()
    try {
      await this.#driver.beginTransaction(conn, settings)
    } catch (e) {
      await this.#recover(conn, e)
      throw e
    }
  }

  async commit(): Promise<void> {
    const conn = this.#conn
    if (!conn) return // handed back after a failure; Kysely's follow-up call has nothing to do
    try {
      await this.#driver.commit(conn)
    } catch (e) {
      await this.#recover(conn, e)
      throw e
    }
  }

  async rollback(): Promise<void> {
    const conn = this.#conn
    if (!conn) return
    try {
      await this.#driver.rollback(conn)
    } catch (e) {
      this.#broken ??= e
      await this.#handBack()
      throw e
    }
  }

  savepoint(name: string, compileQuery: QueryCompiler['compileQuery']): Promise<void> {
    return this.#driver.savepoint(this.#live(), name, compileQuery)
  }

  rollbackToSavepoint(name: string, compileQuery: QueryCompiler['compileQuery']): Promise<void> {
    return this.#driver.rollbackToSavepoint(this.#live(), name, compileQuery)
  }

  releaseSavepoint(name: string, compileQuery: QueryCompiler['compileQuery']): Promise<void> {
    return this.#driver.releaseSavepoint(this.#live(), name, compileQuery)
  }

  release(): Promise<void> {
    return this.#handBack()
  }

  /** After a failed BEGIN/COMMIT: leave no transaction open, then give the connection back now. */
  async #recover(conn: DatabaseConnection, error: unknown): Promise<void> {
    this.#note(conn, error)
    if (this.#broken === undefined) {
      try {
        await this.#driver.rollback(conn)
      } catch (e) {
        this.#broken = e
      }
    }
    await this.#handBack()
  }

  async #handBack(): Promise<void> {
    const conn = this.#conn
    if (!conn) return
    this.#conn = undefined
    const broken = this.#broken
    await this.#driver.release(
      conn,
      broken === undefined ? { destroy: false } : { destroy: true, error: broken },
    )
  }

  #note(conn: DatabaseConnection, error: unknown): void {
    if (this.#broken === undefined && this.#driver.isFatal(conn, error)) this.#broken = error
  }

  #live(): DatabaseConnection {
    if (this.#conn) return this.#conn
    throw new Error(
      'This transaction ended when its BEGIN, COMMIT or ROLLBACK failed, and its connection went ' +
        'back to the pool. Fix: start a new transaction.',
    )
  }
}
