/**
 * The Kysely Driver (and connection provider) behind `scopedKysely`: it
 * routes every connection request to the current scope's session.
 */
import type { Scope, Session } from '@scoped/core'
import { NoActiveScopeError } from '@scoped/core'
import type {
  ConnectionProvider,
  DatabaseConnection,
  Driver,
  Log,
  QueryCompiler,
  TransactionSettings,
} from 'kysely'
import type { KyselyDriver } from './kysely-driver.js'
import { PoolConnection } from './pool-connection.js'
import type { RoutedConnection } from './routed-connection.js'
import { SessionConnection } from './session-connection.js'

export type OutsideScope = 'throw' | 'pool'

/** Never aborts: outside a scope there is no request to give up on the checkout. */
const never = new AbortController().signal

/**
 * Kysely asks for a connection per query, per transaction, per
 * `db.connection()` and per stream. Inside a scope the answer is a handle on
 * the session (no checkout yet: the session checks out on its first
 * statement); outside, a pooled connection or `NoActiveScopeError`.
 *
 * It is the Kysely instance's connection provider as well as its driver: a
 * handle on a session needs no acquire/release round through Kysely's
 * runtime driver, which saves that work on every query.
 */
export class ScopedDriver implements Driver, ConnectionProvider {
  #scope: Scope<DatabaseConnection>
  #driver: KyselyDriver
  #outsideScope: OutsideScope
  #log: Log | undefined

  constructor(
    scope: Scope<DatabaseConnection>,
    driver: KyselyDriver,
    outsideScope: OutsideScope,
    log: Log | undefined,
  ) {
    this.#scope = scope
    this.#driver = driver
    this.#outsideScope = outsideScope
    this.#log = log
  }

  provideConnection<T>(consumer: (connection: DatabaseConnection) => Promise<T>): Promise<T> {
    let session: ReturnType<Scope<DatabaseConnection>['getSession']>
    try {
      // Throws SessionClosedError when the scope of this code already ended.
      session = this.#scope.getSession()
    } catch (e) {
      return this.#provideOutside(e, consumer)
    }
    const conn = new SessionConnection(session, this.#driver, this.#log)
    if (session.releasesWhenIdle) return this.#retained(session, conn, consumer)
    try {
      return consumer(conn)
    } catch (e) {
      return Promise.reject(e)
    }
  }

  /**
   * `release: 'idle'`: whatever Kysely runs on one connection handle
   * (`db.connection().execute(fn)`, a transaction, `startTransaction()`) keeps
   * the session's connection until it is done, so its statements share it.
   */
  async #retained<T>(
    session: Session<DatabaseConnection>,
    conn: SessionConnection,
    consumer: (connection: DatabaseConnection) => Promise<T>,
  ): Promise<T> {
    const done = session.retain()
    try {
      return await consumer(conn)
    } finally {
      done()
    }
  }

  async #provideOutside<T>(
    error: unknown,
    consumer: (connection: DatabaseConnection) => Promise<T>,
  ): Promise<T> {
    const conn = await this.#outside(error)
    try {
      return await consumer(conn)
    } finally {
      await conn.release()
    }
  }

  async init(): Promise<void> {}

  acquireConnection(): Promise<DatabaseConnection> {
    let session: ReturnType<Scope<DatabaseConnection>['getSession']>
    try {
      session = this.#scope.getSession()
    } catch (e) {
      return this.#outside(e)
    }
    return Promise.resolve(new SessionConnection(session, this.#driver, this.#log))
  }

  async #outside(error: unknown): Promise<RoutedConnection> {
    if (!(error instanceof NoActiveScopeError)) throw error
    if (this.#outsideScope === 'pool') {
      return new PoolConnection(this.#driver, await this.#driver.acquire(never), this.#log)
    }
    throw new NoActiveScopeError(this.#scope.name, 'A query through scopedKysely()')
  }

  beginTransaction(conn: DatabaseConnection, settings: TransactionSettings): Promise<void> {
    return routed(conn).begin(settings)
  }

  commitTransaction(conn: DatabaseConnection): Promise<void> {
    return routed(conn).commit()
  }

  rollbackTransaction(conn: DatabaseConnection): Promise<void> {
    return routed(conn).rollback()
  }

  savepoint(
    conn: DatabaseConnection,
    name: string,
    compileQuery: QueryCompiler['compileQuery'],
  ): Promise<void> {
    return routed(conn).savepoint(name, compileQuery)
  }

  rollbackToSavepoint(
    conn: DatabaseConnection,
    name: string,
    compileQuery: QueryCompiler['compileQuery'],
  ): Promise<void> {
    return routed(conn).rollbackToSavepoint(name, compileQuery)
  }

  releaseSavepoint(
    conn: DatabaseConnection,
    name: string,
    compileQuery: QueryCompiler['compileQuery'],
  ): Promise<void> {
    return routed(conn).releaseSavepoint(name, compileQuery)
  }

  releaseConnection(conn: DatabaseConnection): Promise<void> {
    return routed(conn).release()
  }

  /**
   * `db.destroy()`: the scope owns the pool, so this closes the scope (waits
   * for open sessions, then ends the pool), as `scope.close()` does.
   */
  destroy(): Promise<void> {
    return this.#scope.close()
  }
}

function routed(conn: DatabaseConnection): RoutedConnection {
  if (conn instanceof SessionConnection || conn instanceof PoolConnection) return conn
  throw new TypeError(
    'scopedKysely: a connection of another Kysely instance was passed to this one.',
  )
}
