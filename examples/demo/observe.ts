/**
 * Figures read from the running system: the pool (peak checked out, peak
 * waiting) sampled at every checkout and every 20 ms, and `pg_stat_activity`
 * read on a separate connection.
 */
import dc from 'node:diagnostics_channel'
import type { AcquireMessage } from '@scoped/core'
import pg from 'pg'

export interface PoolLike {
  readonly totalCount: number
  readonly idleCount: number
  readonly waitingCount: number
}

export interface PoolWatch {
  readonly peakInUse: number
  readonly peakWaiting: number
  stop(): void
}

/** Track the most connections checked out (and requests waiting) at once. */
export function watchPool(pool: PoolLike, scopeName?: string): PoolWatch {
  let peakInUse = 0
  let peakWaiting = 0
  const sample = () => {
    peakInUse = Math.max(peakInUse, pool.totalCount - pool.idleCount)
    peakWaiting = Math.max(peakWaiting, pool.waitingCount)
  }
  // At each checkout the count is at a local high; the timer catches the waiting side.
  const onAcquire = (m: unknown) => {
    if (scopeName === undefined || (m as AcquireMessage).scope === scopeName) sample()
  }
  if (scopeName !== undefined) dc.subscribe('scoped:acquire', onAcquire)
  const timer = setInterval(sample, 20)
  return {
    get peakInUse() {
      return peakInUse
    },
    get peakWaiting() {
      return peakWaiting
    },
    stop() {
      sample()
      clearInterval(timer)
      if (scopeName !== undefined) dc.unsubscribe('scoped:acquire', onAcquire)
    },
  }
}

/** `pg_stat_activity` of one application: backends by state, e.g. `{ idle: 10 }` or `{ 'idle in transaction': 10 }`. */
export async function activity(
  url: string,
  applicationName: string,
): Promise<Record<string, number>> {
  const client = new pg.Client({ connectionString: url, application_name: 'scoped-demo-observer' })
  await client.connect()
  try {
    const { rows } = await client.query<{ state: string; n: number }>(
      `SELECT coalesce(state, 'unknown') AS state, count(*)::int AS n
         FROM pg_stat_activity WHERE application_name = $1 GROUP BY 1 ORDER BY 1`,
      [applicationName],
    )
    return Object.fromEntries(rows.map((r) => [r.state, r.n]))
  } finally {
    await client.end()
  }
}

/** One query on a separate connection (counts in the demo's databases). */
export async function queryOne<T>(url: string, sql: string, values: unknown[] = []): Promise<T> {
  const client = new pg.Client({ connectionString: url, application_name: 'scoped-demo-observer' })
  await client.connect()
  try {
    return (await client.query(sql, values)).rows[0] as T
  } finally {
    await client.end()
  }
}

export function describeActivity(a: Record<string, number>): string {
  const parts = Object.entries(a).map(([state, n]) => `${n} ${state}`)
  return parts.length > 0 ? parts.join(', ') : 'no connections'
}
