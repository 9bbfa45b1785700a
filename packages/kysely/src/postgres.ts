/**
 * What kyselyDriver knows about PostgreSQL beyond @scoped/pg's error
 * classification and cancel: how to recognise the dialect and its pool, and
 * how to reach the pg client behind a Kysely connection — the only way to
 * really destroy one, cancel its statement, or keep a dying backend from
 * crashing the process.
 *
 * No import of `pg`: it stays the application's dependency; the pool is typed
 * by the few members used here.
 */
import type { CancellableClient } from '@scoped/pg'
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
interface PgClientLike extends CancellableClient {
  /** node-postgres 8.23+ `pipeline: true`: statements go on the wire without waiting for the previous one. */
  pipeline?: boolean
  /** libpq's transaction status of the last answer: `I` idle, `T` in a transaction, `E` failed one. */
  getTransactionStatus?(): string
  release(error?: Error | boolean): void
  on(event: 'error', listener: (error: Error) => void): unknown
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
