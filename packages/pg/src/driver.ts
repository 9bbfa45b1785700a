/**
 * The node-postgres driver: sessions check `pg.PoolClient`s out of a `pg.Pool`.
 */
import type { Driver, PoolStats, SessionInfo, TxOptions } from '@scoped/core'
import { TransactionStateError } from '@scoped/core'
import type pg from 'pg'
import { CancelGuard } from './cancel.js'
import { commitRefusal, isFatalPgError, isRetryablePgError, noteConnectionLost } from './errors.js'

export interface PgDriverOptions {
  /**
   * `SET LOCAL statement_timeout` at the start of every transaction. Per
   * transaction, so it is safe behind PgBouncer in transaction pooling mode.
   */
  statementTimeoutMs?: number
  /**
   * `SET LOCAL application_name` at the start of every transaction, so
   * `pg_stat_activity` shows who holds a backend. `'auto'`: the session's name
   * (e.g. `GET /orders/:id`, `job:sync`).
   */
  applicationName?: string | 'auto'
  /**
   * Check (`SELECT 1`) a client that sat idle in the pool longer than this
   * before handing it out, so a connection broken by a server restart never
   * reaches a request. Default 30 000; 0 = never check.
   */
  validateIdleMs?: number
  /** Called with errors of idle clients in the pool (pg-pool drops them). Default: `console.warn`. */
  onIdleError?: (error: Error) => void
}

interface ClientState {
  error: Error | undefined
  releasedAt: number
  /** pg-pool's `release` of the current checkout (it makes one per checkout); see own(). */
  release: ((err?: Error | boolean) => void) | undefined
}

/**
 * What a checked-out client's `release` becomes while a session holds it. The session
 * gives it back itself, at the end of its request or job; a `release()` of the user's
 * (the plain-pg `finally { client.release() }` habit, after `getSession().connection()`)
 * would hand the client to the next request while this one still owns it, and this
 * one's COMMIT would then commit the next request's work.
 */
function refuseRelease(): never {
  throw new TypeError(
    "release() on a session's connection: the session gives its connection back itself, when " +
      'its request or job ends (a release() now would hand it to another request while this ' +
      'one still uses it). Fix: remove the release() call; for a connection of your own, use ' +
      'pool.connect() outside the scope.',
  )
}

const known = new Set(['statementTimeoutMs', 'applicationName', 'validateIdleMs', 'onIdleError'])
const poolsWithListener = new WeakSet<object>()

function check(name: string, v: unknown, ok: boolean, expected: string): void {
  if (!ok) {
    const got =
      typeof v === 'number' || typeof v === 'string'
        ? JSON.stringify(v)
        : v === null
          ? 'null'
          : typeof v
    throw new TypeError(`pgDriver(pool, { ${name} }): expected ${expected}, got ${got}`)
  }
}

function isPool(pool: unknown): pool is pg.Pool {
  const p = pool as Record<string, unknown> | null
  return (
    typeof p === 'object' &&
    p !== null &&
    typeof p.connect === 'function' &&
    typeof p.query === 'function' &&
    typeof p.on === 'function' &&
    typeof p.totalCount === 'number'
  )
}

function isEnded(pool: pg.Pool): boolean {
  const p = pool as { ended?: boolean; ending?: boolean }
  return p.ended === true || p.ending === true
}

function quoteIdent(name: string): string {
  return `"${name.replace(/"/g, '""')}"`
}

function quoteLiteral(value: string): string {
  // Standard-conforming strings are on by default since PostgreSQL 9.1.
  return `'${value.replace(/'/g, "''")}'`
}

/**
 * A `Driver` over a node-postgres `Pool`.
 *
 * - listens for `error` on every client it checks out and on the pool (an
 *   unhandled one would crash the process), and destroys a client that errored;
 * - destroys, instead of returning, a client whose transaction status is not
 *   idle at release, so a half-open transaction never reaches the next request;
 * - applies session settings with `SET LOCAL` inside the transaction.
 *
 * @example
 * ```ts
 * import pg from 'pg'
 * import { createScope } from '@scoped/core'
 * import { pgDriver } from '@scoped/pg'
 *
 * const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL, max: 10 })
 * export const scope = createScope({ driver: pgDriver(pool, { statementTimeoutMs: 5_000 }) })
 * ```
 */
export function pgDriver(pool: pg.Pool, options: PgDriverOptions = {}): Driver<pg.PoolClient> {
  if (!isPool(pool)) {
    throw new TypeError(
      'pgDriver(pool): expected a pg.Pool (an object with connect(), query(), on() and totalCount), ' +
        `got ${pool === null ? 'null' : typeof pool}. Pass new pg.Pool({ ... }), not a pg.Client or a connection string.`,
    )
  }
  if (isEnded(pool)) {
    throw new TypeError(
      'pgDriver(pool): the pool has ended (pool.end() was called), so it hands out no connections. ' +
        'Pass a pool that is open; scope.close() ends the pool for you when the app shuts down.',
    )
  }
  if (typeof options !== 'object' || options === null) {
    throw new TypeError(
      `pgDriver(pool, options): expected an object, got ${options === null ? 'null' : typeof options}`,
    )
  }
  for (const key of Object.keys(options)) {
    if (!known.has(key)) {
      throw new TypeError(
        `pgDriver(pool, { ${key} }): unknown option. Known options: ${[...known].join(', ')}`,
      )
    }
  }
  const { statementTimeoutMs, applicationName, validateIdleMs = 30_000, onIdleError } = options
  check(
    'statementTimeoutMs',
    statementTimeoutMs,
    statementTimeoutMs === undefined ||
      (Number.isInteger(statementTimeoutMs) && statementTimeoutMs >= 0),
    'an integer number of milliseconds >= 0',
  )
  check(
    'applicationName',
    applicationName,
    applicationName === undefined ||
      (typeof applicationName === 'string' && applicationName.length > 0),
    "a non-empty string or 'auto'",
  )
  check(
    'validateIdleMs',
    validateIdleMs,
    Number.isFinite(validateIdleMs) && validateIdleMs >= 0,
    'a finite number of milliseconds >= 0',
  )
  check(
    'onIdleError',
    onIdleError,
    onIdleError === undefined || typeof onIdleError === 'function',
    'a function',
  )

  const states = new WeakMap<pg.PoolClient, ClientState>()
  // A client with a cancel in flight goes back to the pool only once the cancel is done.
  const cancels = new CancelGuard<pg.PoolClient>()
  if (!poolsWithListener.has(pool)) {
    poolsWithListener.add(pool)
    // An idle client's error (server restart, network) is emitted on the pool, which drops the
    // client; without a listener it would crash the process.
    pool.on('error', (err) => {
      if (onIdleError) onIdleError(err)
      else
        console.warn(`[scoped/pg] an idle pooled connection failed and was dropped: ${err.message}`)
    })
  }

  const settings = (info: SessionInfo | undefined): string => {
    let sql = ''
    if (statementTimeoutMs !== undefined)
      sql += `; SET LOCAL statement_timeout = ${statementTimeoutMs}`
    const app = applicationName === 'auto' ? info?.name : applicationName
    if (app !== undefined) sql += `; SET LOCAL application_name = ${quoteLiteral(app.slice(0, 63))}`
    return sql
  }

  const track = (client: pg.PoolClient): ClientState => {
    let state = states.get(client)
    if (!state) {
      const s: ClientState = { error: undefined, releasedAt: 0, release: undefined }
      states.set(client, s)
      // Attached once per client, for its whole life: a checked-out client has no other listener.
      client.on('error', (err) => {
        s.error ??= err
        noteConnectionLost(client, err)
      })
      state = s
    }
    return state
  }

  const ended = () =>
    // pg would say "Cannot use a pool after calling end on the pool"; say which pool and why.
    new Error(
      'pgDriver: the pool has ended (pool.end() was called on it, or its scope was closed), so no ' +
        'connection can be checked out. Fix: end the pool only through scope.close(), after the last request.',
    )

  /** A tracked client that neither failed nor sat idle past validateIdleMs: hand it out as is. */
  const ready = (state: ClientState): boolean =>
    !state.error &&
    !(
      validateIdleMs > 0 &&
      state.releasedAt > 0 &&
      performance.now() - state.releasedAt > validateIdleMs
    )

  /**
   * The checkout in one promise: pg-pool's callback API (its promise API adds two more), and
   * the usual client, fresh or recently used, goes out at once. One that failed or needs
   * validation takes the slow path below.
   */
  const acquire = (signal: AbortSignal): Promise<pg.PoolClient> => {
    if (signal.aborted) return Promise.reject(signal.reason)
    if (isEnded(pool)) return Promise.reject(ended())
    return new Promise((resolve, reject) => {
      pool.connect((err, client) => {
        if (err || !client) {
          reject(err ?? new Error('pgDriver: pool.connect() gave neither a client nor an error'))
          return
        }
        const state = track(client)
        if (ready(state)) resolve(own(client, state))
        else resolve(acquireSlowly(signal, client))
      })
    })
  }

  /** Validate `first`, and go on checking clients out until one is fit; bounded by the pool size. */
  const acquireSlowly = async (
    signal: AbortSignal,
    first: pg.PoolClient,
  ): Promise<pg.PoolClient> => {
    const attempts = (pool.options?.max ?? 10) + 1
    let client: pg.PoolClient | undefined = first
    for (let i = 0; ; i++) {
      if (client === undefined) {
        signal.throwIfAborted()
        if (isEnded(pool)) throw ended()
        client = await pool.connect()
      }
      const state = track(client)
      if (state.error) {
        client.release(state.error)
        client = undefined
        continue
      }
      if (!ready(state)) {
        try {
          await client.query('SELECT 1')
        } catch (err) {
          client.release(err instanceof Error ? err : true)
          client = undefined
          if (i + 1 >= attempts) throw err
          continue
        }
      }
      return own(client, state)
    }
  }

  /** The session owns the client from here: its `release` refuses (see refuseRelease). */
  const own = (client: pg.PoolClient, state: ClientState): pg.PoolClient => {
    state.release = client.release
    client.release = refuseRelease
    return client
  }

  /** Give the client back to pg-pool through the checkout's own `release`. */
  const giveBack = (client: pg.PoolClient, state: ClientState | undefined, err?: Error): void => {
    const release = state?.release
    if (release === undefined) {
      client.release(err)
      return
    }
    state!.release = undefined
    client.release = release
    release(err)
  }

  const releaseNow = (client: pg.PoolClient, destroy: boolean, error: unknown): void => {
    const state = states.get(client)
    const dirty =
      client.getTransactionStatus?.() !== undefined && client.getTransactionStatus() !== 'I'
    const reason = error ?? state?.error
    if (destroy || dirty || state?.error) {
      const err =
        reason instanceof Error
          ? reason
          : new Error(
              dirty ? 'client released inside a transaction' : 'client destroyed by @scoped/pg',
            )
      giveBack(client, state, err)
      return
    }
    if (state) state.releasedAt = performance.now()
    giveBack(client, state)
  }

  const driver: Driver<pg.PoolClient> = {
    name: 'pg',
    acquire,
    release(client, { destroy, error }) {
      const pending = cancels.settled(client)
      if (pending) return pending.then(() => releaseNow(client, destroy, error))
      releaseNow(client, destroy, error)
    },
    // Plain promise chains, not async functions: one promise less per statement of the unit.
    begin(client, opts: TxOptions, info?: SessionInfo) {
      let sql = 'BEGIN'
      if (opts.isolation) sql += ` ISOLATION LEVEL ${opts.isolation.toUpperCase()}`
      if (opts.readOnly !== undefined) sql += opts.readOnly ? ' READ ONLY' : ' READ WRITE'
      // One round trip: BEGIN and the SET LOCALs go as one simple-protocol message.
      return statement(client, sql + settings(info))
    },
    commit(client) {
      const lost = states.get(client)?.error
      if (lost) {
        // pg would only say "not queryable"; say what happened to the transaction, and why.
        return Promise.reject(
          new TransactionStateError(
            `COMMIT was not sent: the connection failed before it (${lost.message}), so PostgreSQL ` +
              'discarded the transaction and nothing was committed. Fix: retry the unit of work; ' +
              'the broken connection is destroyed, not returned to the pool.',
            { cause: lost },
          ),
        )
      }
      let sent: Promise<pg.QueryResult>
      try {
        sent = client.query('COMMIT')
      } catch (e) {
        return Promise.reject(e)
      }
      return sent.then((result) => {
        const refused = commitRefusal(result)
        if (refused) throw refused
      })
    },
    rollback(client) {
      return statement(client, 'ROLLBACK')
    },
    savepoint(client, name) {
      return statement(client, `SAVEPOINT ${quoteIdent(name)}`)
    },
    releaseSavepoint(client, name) {
      return statement(client, `RELEASE SAVEPOINT ${quoteIdent(name)}`)
    },
    rollbackToSavepoint(client, name) {
      return statement(client, `ROLLBACK TO SAVEPOINT ${quoteIdent(name)}`)
    },
    // `new pg.Pool({ pipeline: true })`: the unit of work's BEGIN goes out with its first statement.
    pipelined: (client) => (client as { pipeline?: boolean }).pipeline === true,
    cancel: (client) => cancels.cancel(client),
    isFatal(client, error) {
      return states.get(client)?.error !== undefined || isFatalPgError(error)
    },
    isRetryable: isRetryablePgError,
    poolStats(): PoolStats {
      return {
        total: pool.totalCount,
        idle: pool.idleCount,
        waiting: pool.waitingCount,
        max: pool.options?.max ?? 10,
      }
    },
    async end() {
      if (!pool.ended && !(pool as { ending?: boolean }).ending) await pool.end()
    },
  }
  return Object.freeze(driver)
}

const nothing = (): void => {}

/** Send `sql` and resolve (to nothing) when it is done; a throw of pg's becomes a rejection. */
function statement(client: pg.PoolClient, sql: string): Promise<void> {
  try {
    return client.query(sql).then(nothing)
  } catch (e) {
    return Promise.reject(e)
  }
}
