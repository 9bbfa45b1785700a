/**
 * Soak (and soak under backend kills): `total` requests through one adapter,
 * 64 client connections, the brief's mix of endings. Afterwards nothing is
 * checked out, nothing is idle in transaction, committed units and answered
 * requests match both ways, and heap and RSS are flat.
 *
 * With `kills`, every 100 ms one random in-use backend of the app's database
 * is terminated (`pg_terminate_backend`) while the load runs. Then: the
 * process keeps serving, only as many requests fail unexpectedly as backends
 * were killed, each with a connection error, the dead clients are destroyed
 * (none stays in the pool), the pool refills to its maximum, and the soak
 * checks still hold.
 */
import pg from 'pg'
import { expect } from 'vitest'
import { independentQuery } from '../../support/db.ts'
import { type Adapter, startApp } from '../support/apps.ts'
import { checkUnits, leaks, leakTotal, lostCount, unitProblems } from '../support/checks.ts'
import { harness } from '../support/harness.ts'
import {
  ABORTED,
  CommitLedger,
  type LoadResult,
  NET_ERROR,
  runLoad,
  soakMix,
} from '../support/load.ts'
import { describeTrend, MemorySampler } from '../support/memory.ts'
import { record } from '../support/report.ts'

export interface SoakOptions {
  total: number
  concurrency?: number
  poolMax?: number
  /** Terminate a random in-use backend every `everyMs` while the load runs. */
  kills?: { everyMs: number }
  /** Heap growth allowed per 1,000 requests after warm-up (bytes). */
  maxHeapPerK: number
  seed?: number
  /** Connect the app here (PgBouncer); its database must have the units table. */
  url?: string
  /** Check the outcome here: a direct connection to the same database. */
  checkUrl?: string
  /** The report's scenario name and what was in the way. Default: soak / backend kills. */
  scenario?: string
  via?: string
}

/** Which requests failed although their kind should not have: an `ok` not answered 200, and so on. */
export function unexpectedFailures(load: LoadResult): number[] {
  const out: number[] = []
  for (let i = 0; i < load.sent; i++) {
    const k = load.kinds[i]!
    const c = load.client[i]!
    const expected =
      k === 'ok' || k === 'slow'
        ? c === 200
        : k === 'throw'
          ? c === 500
          : k === 'fail5xx'
            ? c === 503
            : k === 'timeout'
              ? c === 503 || c === 504
              : c === 200 || c === ABORTED // abort: the race decides
    if (!expected) out.push(i)
  }
  return out
}

function reasons(load: LoadResult): string {
  return [...load.reasons.entries()]
    .sort((a, b) => b[1] - a[1])
    .slice(0, 6)
    .map(([r, n]) => `${n}× ${r}`)
    .join('; ')
}

export function failedCount(load: LoadResult): number {
  let n = 0
  for (let i = 0; i < load.sent; i++) {
    const c = load.client[i]!
    if (c >= 500 || c === NET_ERROR || c === ABORTED) n++
  }
  return n
}

export async function soak(adapter: Adapter, o: SoakOptions): Promise<void> {
  const scenario = o.scenario ?? (o.kills ? 'backend kills' : 'soak')
  const concurrency = o.concurrency ?? 64
  const poolMax = o.poolMax ?? 16
  const started = performance.now()
  const name = `rel_${o.kills ? 'kills' : 'soak'}_${adapter}`
  const h = await harness(name, { max: poolMax, ...(o.url && { url: o.url }) })
  const checkUrl = o.checkUrl ?? h.url
  const ledger = new CommitLedger()
  const app = await startApp(adapter, {
    scope: h.scope,
    db: h.db,
    onCommit: (id) => ledger.note(id),
  })
  const memory = new MemorySampler()
  const unhandled: unknown[] = []
  const onUnhandled = (e: unknown) => unhandled.push(e)
  process.on('unhandledRejection', onUnhandled)

  let killer: { stop(): Promise<number> } | undefined
  if (o.kills) killer = await startKiller(h.url, o.kills.everyMs, o.seed ?? 7)
  const every = Math.max(50, Math.floor(o.total / 40))
  memory.sample(0)
  let load: LoadResult
  let killed = 0
  try {
    load = await runLoad(app.server, {
      port: app.port,
      total: o.total,
      concurrency,
      mix: soakMix,
      seed: o.seed ?? 20_251_122,
      ledger,
      progress: { every, fn: (done) => memory.sample(done) },
    })
  } finally {
    killed = (await killer?.stop()) ?? 0
  }
  const problems: string[] = []
  const unexpected = unexpectedFailures(load)
  let refill = ''
  if (o.kills) {
    // Only the requests on a killed backend failed, each with a connection error.
    if (unexpected.length > killed) {
      problems.push(
        `${unexpected.length} requests failed unexpectedly but only ${killed} backends were killed`,
      )
    }
    if (load.fatalFailures > killed)
      problems.push(`${load.fatalFailures} connection errors from ${killed} kills`)
    for (const i of unexpected) {
      const c = load.client[i]!
      if (c === NET_ERROR)
        problems.push(`${load.idOf(i)} (${load.kinds[i]}): the connection to the app failed`)
    }
    if (killed === 0) problems.push('no backend was killed: the fault was not injected')
    if (h.scope.stats().totals.destroyed < Math.min(killed, 1))
      problems.push('no client was destroyed')
    // The pool refills: twice its size in concurrent slow requests, all answered, the pool at max.
    const burst = await runLoad(app.server, {
      port: app.port,
      total: poolMax * 4,
      concurrency: poolMax * 2,
      mix: [['slow', 1]],
      slowMs: 50,
      seed: 1,
      prefix: 'refill',
    })
    const refillFailed = unexpectedFailures(burst).length
    if (refillFailed > 0) problems.push(`${refillFailed} requests failed after the kills stopped`)
    if (h.pool.totalCount !== poolMax)
      problems.push(`pool refilled to ${h.pool.totalCount}, not ${poolMax}`)
    refill = `; after: ${burst.sent} requests ${refillFailed === 0 ? 'all answered' : `${refillFailed} failed`}, pool back at ${h.pool.totalCount}/${poolMax}`
  } else if (unexpected.length > 0) {
    problems.push(
      `${unexpected.length} requests failed unexpectedly: ${unexpected
        .slice(0, 3)
        .map((i) => `${load.idOf(i)} (${load.kinds[i]}) got ${load.client[i]}`)
        .join(', ')}`,
    )
  }
  const leak = await leaks(checkUrl, h.scope, h.pool)
  if (o.kills) {
    // No dead client left in the pool: every client it holds has a live backend.
    const [row] = await independentQuery<{ n: number }>(
      h.url,
      'SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1',
      [`rel_${name}`.slice(0, 63)],
    )
    const live = row!.n
    if (live !== h.pool.totalCount)
      problems.push(`pool holds ${h.pool.totalCount} clients but ${live} backends live`)
  }
  const units = await checkUnits(checkUrl, load, 'u')
  problems.push(...unitProblems(units).slice(0, 10))
  if (leakTotal(leak) > 0) problems.push(`leaked: ${JSON.stringify(leak)}`)
  if (unhandled.length > 0)
    problems.push(`${unhandled.length} unhandled rejections: ${String(unhandled[0])}`)
  const trend = memory.trend()
  if (trend.heapPerK > o.maxHeapPerK) {
    problems.push(
      `heap grows ${Math.round(trend.heapPerK)} B per 1k requests (allowed ${o.maxHeapPerK})`,
    )
  }
  const stats = h.scope.stats()
  process.off('unhandledRejection', onUnhandled)
  await app.close()
  await h.close()

  record({
    scenario,
    adapter,
    load: `${load.sent.toLocaleString('en')} requests, ${concurrency} connections, pool ${poolMax}; mix 70 ok / 10 throw / 5 5xx / 10 abort / 5 timeout; ${units.committed} units committed = ${units.answered} answered 2xx/4xx (${units.lostInFlight} of them lost in flight after COMMIT); the app's afterCommit agrees with the database on every unit`,
    faults: o.kills
      ? `pg_terminate_backend on a random in-use backend every ${o.kills.everyMs} ms: ${killed} killed; ${stats.totals.destroyed} clients destroyed${refill}`
      : `planned: thrown errors, 5xx, client aborts at random moments, handler timeouts${o.via ? `; ${o.via}` : ''}`,
    failed: failedCount(load),
    why: `${unexpected.length} unexpected${o.kills ? ` (≤ ${killed} kills)` : ''}; ${reasons(load)}`,
    leaked: leakTotal(leak),
    lost: lostCount(units),
    memory: describeTrend(trend),
    durationMs: performance.now() - started,
    problems,
  })
  expect(problems).toEqual([])
  expect(leak).toEqual({ checkedOut: 0, holders: 0, open: 0, waiting: 0, idleInTransaction: 0 })
  expect(units.committed).toBe(units.answered)
}

/**
 * Every `everyMs`, terminate one random backend of the database that is not
 * idle (so it is checked out: in a statement or in a transaction).
 */
async function startKiller(
  url: string,
  everyMs: number,
  seed: number,
): Promise<{ stop(): Promise<number> }> {
  const client = new pg.Client({ connectionString: url })
  await client.connect()
  let killed = 0
  let stopped = false
  let rand = seed
  const tick = async () => {
    const { rows } = await client.query<{ pid: number }>(
      "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND state <> 'idle'",
    )
    if (rows.length === 0) return
    rand = (rand * 1_103_515_245 + 12_345) % 2 ** 31
    const pid = rows[rand % rows.length]!.pid
    const r = await client.query<{ ok: boolean }>('SELECT pg_terminate_backend($1) AS ok', [pid])
    if (r.rows[0]!.ok) killed++
  }
  const loop = (async () => {
    while (!stopped) {
      await tick()
      await new Promise((r) => setTimeout(r, everyMs))
    }
  })()
  return {
    async stop() {
      stopped = true
      await loop
      await client.end()
      return killed
    },
  }
}
