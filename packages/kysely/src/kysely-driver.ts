/**
 * kyselyDriver(dialect): a core Driver built on the dialect's own Kysely
 * Driver, so scoped sessions work with every Kysely dialect.
 */
import type { Driver, PoolStats, ReleaseOptions, SessionInfo, TxOptions } from '@scoped/core'
import { TransactionStateError } from '@scoped/core'
import { CancelGuard, isFatalPgError, isRetryablePgError } from '@scoped/pg'
import {
  CompiledQuery,
  type DatabaseConnection,
  type Dialect,
  type Driver as KyselyDialectDriver,
  PostgresDriver,
  type QueryCompiler,
  type TransactionSettings,
} from 'kysely'
import {
  destroyClient,
  isPgPool,
  isPostgresDialect,
  PgClients,
  type PgPoolLike,
} from './postgres.js'
import { SerialConnection } from './serial-connection.js'

export interface KyselyDriverOptions {
  /** The driver's name in stats, metrics and errors. Default `'kysely'`. */
  name?: string
  /**
   * `PostgresDialect` only: the same `pg.Pool` you gave the dialect. With it
   * the driver can really destroy a broken connection (Kysely's driver has no
   * way to), cancel a running statement on abort or job timeout, keep a
   * backend that dies while checked out from crashing the process (pg emits
   * `'error'` on the client), and report pool figures in stats and
   * `PoolTimeoutError`.
   */
  pool?: PgPoolLike
  /**
   * A connection-level error (socket gone, backend terminated): the connection
   * is destroyed. Default for `PostgresDialect`: by SQLSTATE (class 08,
   * 57P01–57P03, 57P05, 25P03, XX000) and socket errors; other dialects: never.
   */
  isFatal?: (error: unknown, connection: DatabaseConnection) => boolean
  /**
   * `transaction(fn, { retry })` re-runs on these. Default for
   * `PostgresDialect`: 40001 and 40P01; other dialects: never.
   */
  isRetryable?: (error: unknown) => boolean
}

const known = new Set(['name', 'pool', 'isFatal', 'isRetryable'])

/**
 * A scope `Driver` over any Kysely dialect. Sessions hold Kysely
 * `DatabaseConnection`s (run one statement at a time, so concurrent callers in
 * a session queue instead of colliding).
 *
 * @example
 * ```ts
 * import pg from 'pg'
 * import { PostgresDialect } from 'kysely'
 * import { createScope } from '@scoped/core'
 * import { kyselyDriver } from '@scoped/kysely'
 *
 * const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL })
 * const dialect = new PostgresDialect({ pool })
 * export const scope = createScope({ driver: kyselyDriver(dialect, { pool }) })
 * ```
 */
export function kyselyDriver(dialect: Dialect, options: KyselyDriverOptions = {}): KyselyDriver {
  return new KyselyDriver(dialect, options)
}

/** The object `kyselyDriver()` returns; `scopedKysely()` recognises it. */
export class KyselyDriver implements Driver<DatabaseConnection> {
  readonly name: string
  /** The dialect this driver was made from (scopedKysely compiles with it by default). */
  readonly dialect: Dialect
  readonly poolStats?: () => PoolStats
  readonly cancel?: (conn: DatabaseConnection) => Promise<void>
  /**
   * PostgresDialect with `pool`, on a pg pool made with `pipeline: true`: the
   * unit of work's BEGIN goes on the wire with its first statement (the core
   * sends it without waiting; see Driver.pipelined).
   */
  readonly pipelined?: (conn: DatabaseConnection) => boolean

  #driver: KyselyDialectDriver
  #compiler: QueryCompiler
  #postgres: boolean
  /**
   * Kysely's own PostgresDriver, its BEGIN and COMMIT not overridden (a
   * subclassed dialect may add to them): those statements are sent directly.
   */
  #plainPostgres = false
  #pool: PgPoolLike | undefined
  #clients: PgClients | undefined
  /** Cancels in flight, by pg client: a client goes back to the pool only once its cancel is done. */
  #cancels: CancelGuard | undefined
  #pids = new WeakMap<DatabaseConnection, number>()
  #init: Promise<void> | undefined
  #initDone = false
  #isFatal: ((error: unknown, connection: DatabaseConnection) => boolean) | undefined
  #isRetryable: ((error: unknown) => boolean) | undefined

  /** @internal Use `kyselyDriver(dialect, options)`. */
  constructor(dialect: Dialect, options: KyselyDriverOptions) {
    const d = dialect as Partial<Dialect> | null
    if (
      typeof d !== 'object' ||
      d === null ||
      typeof d.createDriver !== 'function' ||
      typeof d.createQueryCompiler !== 'function'
    ) {
      throw new TypeError(
        `kyselyDriver(dialect): expected a Kysely Dialect (e.g. new PostgresDialect({ pool })), got ${describe(dialect)}`,
      )
    }
    if (typeof options !== 'object' || options === null) {
      throw new TypeError(
        `kyselyDriver(dialect, options): expected an object, got ${describe(options)}`,
      )
    }
    for (const key of Object.keys(options)) {
      if (!known.has(key)) {
        throw new TypeError(
          `kyselyDriver(dialect, { ${key} }): unknown option. Known options: ${[...known].join(', ')}`,
        )
      }
    }
    const { name = 'kysely', pool, isFatal, isRetryable } = options
    if (typeof name !== 'string' || name === '') {
      throw new TypeError(
        `kyselyDriver(dialect, { name }): expected a non-empty string, got ${describe(name)}`,
      )
    }
    for (const [key, fn] of [
      ['isFatal', isFatal],
      ['isRetryable', isRetryable],
    ] as const) {
      if (fn !== undefined && typeof fn !== 'function') {
        throw new TypeError(
          `kyselyDriver(dialect, { ${key} }): expected a function, got ${describe(fn)}`,
        )
      }
    }
    this.#postgres = isPostgresDialect(dialect)
    if (pool !== undefined) {
      if (!this.#postgres) {
        throw new TypeError(
          `kyselyDriver(dialect, { pool }): pool is for PostgresDialect (a pg.Pool), but the dialect is ${dialect.constructor?.name ?? 'unknown'}. Remove the option.`,
        )
      }
      if (!isPgPool(pool)) {
        throw new TypeError(
          `kyselyDriver(dialect, { pool }): expected the pg.Pool you gave PostgresDialect, got ${describe(pool)}`,
        )
      }
      this.#pool = pool
      this.#clients = new PgClients(pool)
      this.poolStats = () => ({
        total: pool.totalCount,
        idle: pool.idleCount,
        waiting: pool.waitingCount,
        max: pool.options?.max ?? 10,
      })
      const clients = this.#clients
      const cancels = new CancelGuard()
      this.#cancels = cancels
      this.cancel = async (conn) => {
        const client = clients.client(pidOf(conn))
        if (client) await cancels.cancel(client)
      }
    }
    this.name = name
    this.dialect = dialect
    this.#driver = dialect.createDriver()
    this.#plainPostgres =
      this.#postgres &&
      this.#driver.beginTransaction === PostgresDriver.prototype.beginTransaction &&
      this.#driver.commitTransaction === PostgresDriver.prototype.commitTransaction
    if (this.#plainPostgres && this.#clients) {
      this.pipelined = (conn) => own(conn)?.pipelined === true
    }
    this.#compiler = dialect.createQueryCompiler()
    this.#isFatal = isFatal
    this.#isRetryable = isRetryable ?? (this.#postgres ? isRetryablePgError : undefined)
    Object.freeze(this)
  }

  /** Check a connection out of the dialect's pool (initialising the dialect's driver once). */
  acquire(signal: AbortSignal): Promise<DatabaseConnection> {
    if (!this.#initDone) return this.#initialise().then(() => this.acquire(signal))
    if (signal.aborted) return Promise.reject(signal.reason)
    // Plain promise chains on this path, not async functions: it runs once per unit of work.
    const raw = this.#driver.acquireConnection()
    return this.#clients
      ? raw.then((r) => this.#identify(r))
      : raw.then((r) => new SerialConnection(r))
  }

  /**
   * PostgreSQL with a pool: link the connection to its pg client by backend
   * pid. Known after a physical connection's first checkout: no promise then.
   */
  #identify(raw: DatabaseConnection): SerialConnection | Promise<SerialConnection> {
    const conn = new SerialConnection(raw)
    const pid = this.#pids.get(raw)
    return pid === undefined ? this.#identifyFirst(conn, raw) : this.#linked(conn, pid)
  }

  async #identifyFirst(conn: SerialConnection, raw: DatabaseConnection): Promise<SerialConnection> {
    let pid: number
    try {
      pid = await this.#pidOf(raw)
    } catch (e) {
      await this.release(conn, { destroy: true, error: e })
      throw e
    }
    return this.#linked(conn, pid)
  }

  /** The connection's backend pid, and whether its pg client pipelines. */
  #linked(conn: SerialConnection, pid: number): SerialConnection {
    conn.pid = pid
    conn.pipelined = this.#clients!.client(pid)?.pipeline === true
    return conn
  }

  /**
   * Give a connection back. `destroy`: with a pg pool the client is closed;
   * without one (any other dialect) there is no way to close a single Kysely
   * connection, so it is rolled back (a dead one is dropped by its pool) and
   * handed back to the dialect's pool. See the README's "Limits".
   */
  release(connection: DatabaseConnection, opts: ReleaseOptions): Promise<void> {
    const conn = own(connection)
    if (!conn) return foreign()
    const client = this.#clients?.client(conn.pid)
    // A late CancelRequest would cancel the next holder's statement: wait for it first.
    const cancelling = client && this.#cancels?.settled(client)
    if (cancelling) return cancelling.then(() => this.#releaseNow(conn, opts, client))
    return this.#releaseNow(conn, opts, client)
  }

  #releaseNow(
    conn: SerialConnection,
    opts: ReleaseOptions,
    client: ReturnType<PgClients['client']>,
  ): Promise<void> {
    // A transaction left open on it (a raw `begin` through db or db.connection()) must not reach
    // the next holder, whose statements would run, and be lost, inside it.
    const status = client?.getTransactionStatus?.()
    const dirty = status !== undefined && status !== 'I'
    if (!opts.destroy && !dirty) return this.#driver.releaseConnection(conn.raw)
    if (client) {
      destroyClient(
        client,
        opts.error ?? (dirty ? new Error('connection released inside a transaction') : undefined),
      )
      return Promise.resolve()
    }
    return this.#releaseUndestroyable(conn, opts.error)
  }

  async #releaseUndestroyable(conn: SerialConnection, error: unknown): Promise<void> {
    if (error === undefined || !this.isFatal(conn, error)) {
      // The best a Kysely driver allows: leave no transaction open on it (after the statement that
      // may still be running on it, never beside it).
      await conn.run((raw) => this.#driver.rollbackTransaction(raw)).catch(() => {})
    }
    await this.#driver.releaseConnection(conn.raw)
  }

  begin(conn: DatabaseConnection, opts: TxOptions, _info?: SessionInfo): Promise<void> {
    if (this.#plainPostgres && opts.isolation === undefined && opts.readOnly === undefined) {
      // What PostgresDriver.beginTransaction sends, without its async wrapper: once per unit of work.
      const serial = own(conn)
      if (!serial) return foreign()
      serial.failed = false // a new transaction: nothing in it failed yet
      // On a pipelined client BEGIN does not hold the queue: the first statement follows at once.
      return serial.runAhead(runBegin)
    }
    return this.beginTransaction(conn, toSettings(opts))
  }

  /** @internal BEGIN with Kysely's own settings (outside a scope, all of Kysely's levels apply). */
  beginTransaction(connection: DatabaseConnection, settings: TransactionSettings): Promise<void> {
    const conn = own(connection)
    if (!conn) return foreign()
    conn.failed = false // a new transaction: nothing in it failed yet
    return conn.run((raw) => this.#driver.beginTransaction(raw, settings))
  }

  commit(connection: DatabaseConnection): Promise<void> {
    const conn = own(connection)
    if (!conn) return foreign()
    if (this.#postgres && conn.failed) return this.#commitAfterFailure(conn)
    if (this.#plainPostgres) return conn.run(runCommit)
    return conn.run((raw) => this.#driver.commitTransaction(raw))
  }

  /**
   * PostgreSQL answers COMMIT of an aborted transaction with ROLLBACK, and no
   * error. A statement of this transaction failed: unless the application
   * recovered (ROLLBACK TO SAVEPOINT), say so instead of reporting success.
   */
  async #commitAfterFailure(conn: SerialConnection): Promise<void> {
    try {
      await conn.run((raw) => raw.executeQuery(CompiledQuery.raw('select 1')))
    } catch {
      // 25P02 (in failed transaction), or the connection is gone: nothing can commit.
      await this.rollback(conn)
      throw new TransactionStateError(
        'COMMIT was not sent, the transaction was rolled back: a statement in it failed earlier and ' +
          'its error was caught, and PostgreSQL would have answered COMMIT with ROLLBACK. Nothing was ' +
          'committed. Fix: let the error propagate, or run the statement that may fail in a nested ' +
          'db.transaction() (a savepoint) to recover from it.',
      )
    }
    conn.failed = false
    await conn.run((raw) => this.#driver.commitTransaction(raw))
  }

  rollback(connection: DatabaseConnection): Promise<void> {
    const conn = own(connection)
    if (!conn) return foreign()
    return conn.run((raw) => this.#driver.rollbackTransaction(raw))
  }

  savepoint(
    conn: DatabaseConnection,
    name: string,
    compileQuery: QueryCompiler['compileQuery'] = this.#compile,
  ): Promise<void> {
    const driver = this.#driver
    if (!driver.savepoint) return Promise.reject(this.#noSavepoints('savepoint'))
    const serial = own(conn)
    if (!serial) return foreign()
    return serial.run((raw) => driver.savepoint!(raw, name, compileQuery))
  }

  async rollbackToSavepoint(
    connection: DatabaseConnection,
    name: string,
    compileQuery: QueryCompiler['compileQuery'] = this.#compile,
  ): Promise<void> {
    const conn = own(connection)
    if (!conn) return foreign()
    const driver = this.#driver
    if (!driver.rollbackToSavepoint) throw this.#noSavepoints('rollbackToSavepoint')
    await conn.run((raw) => driver.rollbackToSavepoint!(raw, name, compileQuery))
    conn.failed = false
  }

  releaseSavepoint(
    conn: DatabaseConnection,
    name: string,
    compileQuery: QueryCompiler['compileQuery'] = this.#compile,
  ): Promise<void> {
    const driver = this.#driver
    if (!driver.releaseSavepoint) return Promise.reject(this.#noSavepoints('releaseSavepoint'))
    const serial = own(conn)
    if (!serial) return foreign()
    return serial.run((raw) => driver.releaseSavepoint!(raw, name, compileQuery))
  }

  isFatal(conn: DatabaseConnection, error: unknown): boolean {
    if (this.#isFatal) return this.#isFatal(error, conn)
    if (!this.#postgres) return false
    return this.#clients?.errorOf(pidOf(conn)) !== undefined || isFatalPgError(error)
  }

  isRetryable(error: unknown): boolean {
    return this.#isRetryable?.(error) ?? false
  }

  /** Destroy the dialect's driver (for PostgresDialect: end the pg pool). Called by `scope.close()`. */
  async end(): Promise<void> {
    const pool = this.#pool
    if (pool && (pool.ended || (pool as { ending?: boolean }).ending)) return
    if (this.#init) {
      await this.#init.catch(() => {})
      if (this.#initDone) {
        await this.#driver.destroy()
        return
      }
    }
    // Never initialised: the dialect's driver holds nothing, but a pool we were given is still open.
    if (pool) await pool.end()
  }

  #compile: QueryCompiler['compileQuery'] = (node, queryId) =>
    this.#compiler.compileQuery(node, queryId)

  #initialise(): Promise<void> {
    this.#init ??= this.#driver.init().then(
      () => {
        this.#initDone = true
      },
      (e) => {
        this.#init = undefined // a failed init is tried again by the next checkout
        throw e
      },
    )
    return this.#init
  }

  /** The backend pid of a physical connection: asked once, remembered for its life. */
  async #pidOf(raw: DatabaseConnection): Promise<number> {
    let pid = this.#pids.get(raw)
    if (pid === undefined) {
      const { rows } = await raw.executeQuery<{ pid: number }>(
        CompiledQuery.raw('select pg_backend_pid() as pid'),
      )
      pid = Number(rows[0]?.pid)
      if (!this.#clients!.client(pid)) {
        throw new TypeError(
          `kyselyDriver(dialect, { pool }): the connection's backend (pid ${pid}) is not a client of the given pool. ` +
            'Fix: pass the same pg.Pool instance you gave new PostgresDialect({ pool }).',
        )
      }
      this.#pids.set(raw, pid)
    }
    return pid
  }

  #noSavepoints(call: string): Error {
    return new TransactionStateError(
      `${call}: the dialect's Kysely driver (${this.dialect.constructor?.name ?? 'unknown'}) has no ${call}(), ` +
        'so nested transactions (savepoints) are not available with it.',
    )
  }
}

// PostgreSQL's transaction control, exactly as Kysely's PostgresDriver sends it, built once.
const BEGIN = CompiledQuery.raw('begin')
const COMMIT = CompiledQuery.raw('commit')
const nothing = (): void => {}
const runBegin = (raw: DatabaseConnection): Promise<void> => raw.executeQuery(BEGIN).then(nothing)
const runCommit = (raw: DatabaseConnection): Promise<void> => raw.executeQuery(COMMIT).then(nothing)

/** This driver's connection behind a DatabaseConnection the core hands back; undefined if foreign. */
function own(conn: DatabaseConnection): SerialConnection | undefined {
  return conn instanceof SerialConnection ? conn : undefined
}

function pidOf(conn: DatabaseConnection): number | undefined {
  return own(conn)?.pid
}

function foreign(): Promise<never> {
  return Promise.reject(
    new TypeError(
      'kyselyDriver: this connection was not checked out by a kyselyDriver. Fix: give the scope the ' +
        'driver that made the connection.',
    ),
  )
}

/** Core transaction options in Kysely's words. */
export function toSettings(opts: TxOptions): TransactionSettings {
  return {
    ...(opts.isolation !== undefined && { isolationLevel: opts.isolation }),
    ...(opts.readOnly !== undefined && { accessMode: opts.readOnly ? 'read only' : 'read write' }),
  }
}

function describe(v: unknown): string {
  if (typeof v === 'number' || typeof v === 'string') return JSON.stringify(v)
  return v === null ? 'null' : typeof v
}
