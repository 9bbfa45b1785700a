/**
 * What kyselyDriver knows about PostgreSQL: which errors kill a connection or
 * ask for a retry (by SQLSTATE), and, when it is given the dialect's pg.Pool,
 * how to reach the pg client behind a Kysely connection — the only way to
 * really destroy one, cancel its statement, or keep a dying backend from
 * crashing the process.
 *
 * No import of `pg`: it stays the application's dependency; the pool is typed
 * by the few members used here.
 */
import type { Dialect } from 'kysely'
import { PostgresDialect } from 'kysely'

/** The members of a `pg.Pool` kyselyDriver uses. Pass the pool you gave `PostgresDialect`. */
export interface PgPoolLike {
  on(event: 'acquire' | 'remove', listener: (client: any) => void): unknown
  on(event: 'error', listener: (error: Error, client: any) => void): unknown
  listenerCount?(event: string): number
  end(): Promise<void>
  readonly totalCount: number
  readonly idleCount: number
  readonly waitingCount: number
  readonly ended?: boolean
  readonly options?: { max?: number }
}

/** The members of a pg `PoolClient` used here. */
interface PgClientLike {
  processID?: number | null
  secretKey?: number | null
  host?: string
  port?: number
  connection?: { constructor: new () => CancelConnection }
  release(error?: Error | boolean): void
  on(event: 'error', listener: (error: Error) => void): unknown
}

interface CancelConnection {
  connect(portOrPath: number | string, host?: string): void
  cancel(processID: number, secretKey: number): void
  on(event: string, fn: (...args: unknown[]) => void): void
  end?(): void
}

/** SQLSTATEs after which the backend (or the socket) is gone; class 08 is added below. */
const fatalStates = new Set([
  '57P01', // admin_shutdown: pg_terminate_backend, server shutdown
  '57P02', // crash_shutdown
  '57P03', // cannot_connect_now
  '57P05', // idle_session_timeout
  '25P03', // idle_in_transaction_session_timeout
  'XX000', // internal_error: not safe to reuse
])

const fatalSocketCodes = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'EPIPE',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ERR_STREAM_DESTROYED',
  'ERR_STREAM_WRITE_AFTER_END',
])

/** What node-postgres says when the socket is gone and there is no SQLSTATE. */
const fatalMessages = ['Connection terminated', 'is not queryable', 'Query read timeout']

export function codeOf(error: unknown): string | undefined {
  if (typeof error === 'object' && error !== null && 'code' in error) {
    const code = (error as { code: unknown }).code
    return typeof code === 'string' ? code : undefined
  }
  return undefined
}

/** True when the error means the connection must never be reused. */
export function isFatalPostgresError(error: unknown): boolean {
  const code = codeOf(error)
  if (code !== undefined) {
    if (fatalStates.has(code) || code.startsWith('08')) return true // class 08: connection exception
    if (fatalSocketCodes.has(code)) return true
  }
  const message = error instanceof Error ? error.message : ''
  return fatalMessages.some((m) => message.includes(m))
}

/** Serialization failure (40001) or deadlock (40P01): the transaction can simply run again. */
export function isRetryablePostgresError(error: unknown): boolean {
  const code = codeOf(error)
  return code === '40001' || code === '40P01'
}

/** An error the server sent (it has a SQLSTATE): in PostgreSQL it aborts the open transaction. */
export function isServerError(error: unknown): boolean {
  const code = codeOf(error)
  return code !== undefined && /^[0-9A-Z]{5}$/.test(code)
}

/**
 * True for Kysely's `PostgresDialect`. By name as well as by class, so a
 * second copy of kysely (ESM next to CJS) is recognised too.
 */
export function isPostgresDialect(dialect: Dialect): boolean {
  return dialect instanceof PostgresDialect || dialect.constructor?.name === 'PostgresDialect'
}

export function isPgPool(pool: unknown): pool is PgPoolLike {
  const p = pool as Record<string, unknown> | null
  return (
    typeof p === 'object' &&
    p !== null &&
    typeof p.on === 'function' &&
    typeof p.end === 'function' &&
    typeof p.totalCount === 'number' &&
    typeof p.idleCount === 'number'
  )
}

const poolsWithErrorListener = new WeakSet<object>()

/**
 * The clients of one pg.Pool, by backend pid, with the error each one saw.
 *
 * Kysely's Postgres connection keeps its pg client private, so the link is
 * made by the backend pid: `pg_backend_pid()` asked once per physical
 * connection on one side, `client.processID` (known at every checkout, from
 * the pool's `acquire` event) on the other.
 */
export class PgClients {
  #byPid = new Map<number, PgClientLike>()
  #errors = new WeakMap<PgClientLike, Error>()
  #seen = new WeakSet<PgClientLike>()

  constructor(pool: PgPoolLike) {
    pool.on('acquire', (client: PgClientLike) => this.#track(client))
    pool.on('remove', (client: PgClientLike) => {
      const pid = client.processID
      if (typeof pid === 'number' && this.#byPid.get(pid) === client) this.#byPid.delete(pid)
    })
    if (!poolsWithErrorListener.has(pool)) {
      poolsWithErrorListener.add(pool)
      // An idle client's error (server restart, network) is emitted on the pool, which drops the
      // client; with no listener it would crash the process.
      pool.on('error', (err: Error) => {
        console.warn(
          `[scoped/kysely] an idle pooled connection failed and was dropped: ${err.message}`,
        )
      })
    }
  }

  #track(client: PgClientLike): void {
    if (!this.#seen.has(client)) {
      this.#seen.add(client)
      // pg-pool listens for errors only on idle clients; a checked-out client whose backend dies
      // emits 'error' with nobody listening, which crashes the process. Keep a listener for life.
      client.on('error', (err) => {
        if (!this.#errors.has(client)) this.#errors.set(client, err)
      })
    }
    if (typeof client.processID === 'number') this.#byPid.set(client.processID, client)
  }

  /** The client of backend `pid`, if it belongs to this pool. */
  client(pid: number | undefined): PgClientLike | undefined {
    return pid === undefined ? undefined : this.#byPid.get(pid)
  }

  /** The connection-level error the client emitted, if any. */
  errorOf(pid: number | undefined): Error | undefined {
    const client = this.client(pid)
    return client ? this.#errors.get(client) : undefined
  }
}

/**
 * Destroy a checked-out client: pg-pool closes it instead of keeping it. Safe
 * under a running statement (it fails with "Connection terminated").
 */
export function destroyClient(client: PgClientLike, error: unknown): void {
  client.release(
    error instanceof Error ? error : new Error('connection destroyed by @scoped/kysely'),
  )
}

/**
 * Cancel the statement running on `client` with the protocol's CancelRequest:
 * a short extra connection carrying the backend's pid and secret key. It needs
 * no free pool slot and no authentication. Best effort; never rejects.
 */
export function cancelClient(client: PgClientLike): Promise<void> {
  const { processID, secretKey, connection } = client
  if (typeof processID !== 'number' || typeof secretKey !== 'number' || !connection) {
    return Promise.resolve()
  }
  const Connection = connection.constructor
  return new Promise<void>((resolve) => {
    const con = new Connection()
    const done = () => {
      clearTimeout(timer)
      resolve()
    }
    const timer = setTimeout(() => {
      con.end?.()
      done()
    }, 5_000)
    timer.unref()
    con.on('connect', () => con.cancel(processID, secretKey))
    con.on('end', done)
    con.on('error', done)
    if (client.host?.startsWith('/')) con.connect(`${client.host}/.s.PGSQL.${client.port}`)
    else con.connect(client.port ?? 5432, client.host ?? 'localhost')
  })
}
