/**
 * The one interface a database library implements to get scoped sessions.
 *
 * A driver knows how to check a connection out of its pool and back in, and
 * (optionally) how to run transaction control on it. It knows nothing of HTTP
 * or of scopes; the core knows nothing of SQL. Only `name`, `acquire` and
 * `release` are required: a driver without `begin` cannot run in
 * `transaction: 'auto'` mode and the scope says so at creation.
 *
 * @example
 * ```ts
 * const driver: Driver<pg.PoolClient> = {
 *   name: 'pg',
 *   acquire: () => pool.connect(),
 *   release: (client, { destroy, error }) => client.release(destroy ? (error ?? true) : undefined),
 *   begin: async (client) => { await client.query('BEGIN') },
 *   commit: async (client) => { await client.query('COMMIT') },
 *   rollback: async (client) => { await client.query('ROLLBACK') },
 * }
 * ```
 */
export interface Driver<C> {
  /** Shown in stats, metrics and error messages (e.g. `'pg'`, `'kysely'`). */
  readonly name: string
  /**
   * Check a connection out. `signal` aborts when the scope gives up waiting
   * (acquire timeout, client abort, shutdown). A driver that cannot cancel a
   * pending checkout may ignore it: a connection that arrives after the core
   * gave up is released straight back, never leaked. The signal means nothing
   * once the returned promise settled: the core reuses signals that were never
   * aborted and have no listener left (making one per checkout is slow on Node 20).
   */
  acquire(signal: AbortSignal): Promise<C>
  /**
   * Give a connection back. `destroy: true` means it must never be reused:
   * it errored, its transaction state is unknown, or it was taken by force.
   */
  release(conn: C, opts: ReleaseOptions): Promise<void> | void
  /**
   * Open a transaction. `info` names the session, for drivers that tag the
   * connection with it (e.g. `SET LOCAL application_name`).
   */
  begin?(conn: C, opts: TxOptions, info: SessionInfo): Promise<void>
  commit?(conn: C): Promise<void>
  rollback?(conn: C): Promise<void>
  savepoint?(conn: C, name: string): Promise<void>
  releaseSavepoint?(conn: C, name: string): Promise<void>
  rollbackToSavepoint?(conn: C, name: string): Promise<void>
  /**
   * Ask the server to stop the statement running on `conn` now (used on client
   * abort with `cancelOnAbort`, and at job timeouts). Best effort; must not throw.
   */
  cancel?(conn: C): Promise<void>
  /**
   * True when `conn` sends each statement without waiting for the previous
   * one's result, and the server runs them in order (node-postgres
   * `new pg.Pool({ pipeline: true })`). The unit of work's BEGIN then goes on
   * the wire together with its first statement instead of one round trip
   * before it. If that BEGIN fails, the session reports its error, not the
   * "current transaction is aborted" of the statements behind it.
   */
  pipelined?(conn: C): boolean
  /** A connection-level error (socket closed, backend terminated): the connection is destroyed. */
  isFatal?(conn: C, error: unknown): boolean
  /** A serialization failure or deadlock (SQLSTATE 40001 / 40P01): `transaction(fn, { retry })` re-runs. */
  isRetryable?(error: unknown): boolean
  /** The pool's own figures, shown in stats and in `PoolTimeoutError`. */
  poolStats?(): PoolStats
  /** Close the pool. Called once, by `scope.close()`. */
  end?(): Promise<void>
}

/** Who a driver call is for. */
export interface SessionInfo {
  readonly id: string
  readonly name: string
}

export interface ReleaseOptions {
  destroy: boolean
  /** Why the connection is destroyed, when there is a reason. */
  error?: unknown
}

export interface PoolStats {
  total: number
  idle: number
  waiting: number
  max: number
}

export type IsolationLevel = 'read committed' | 'repeatable read' | 'serializable'

export interface TxOptions {
  isolation?: IsolationLevel
  readOnly?: boolean
  /**
   * Re-run the whole transaction from BEGIN when the driver says the error is
   * retryable (40001 serialization failure, 40P01 deadlock). Applies to the
   * outermost transaction only; a nested one lets the error reach it.
   */
  retry?: { attempts: number; backoffMs?: number }
}
