/**
 * `pnpm demo`: the Hono orders service and the worker under a few thousand
 * mixed requests (successes, thrown errors, client aborts, streamed exports),
 * then the same traffic against a naive version that forgets to release on
 * errors, side by side. Every figure is read from the running system:
 * `scope.stats()`, the pg pool, `pg_stat_activity`, the rows.
 *
 * Environment: DEMO_REQUESTS (default 3000), DEMO_CONCURRENCY (default 32),
 * DEMO_NAIVE_SECONDS (how long each naive run may take, default 6),
 * DEMO_REPORT_JSON (write the figures to this file too), DATABASE_URL (use
 * that server instead of an embedded one; the demo creates its own two databases on it).
 */
import dc from 'node:diagnostics_channel'
import { writeFile } from 'node:fs/promises'
import type { AddressInfo } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { createOrders, createSchema, type DB, openDatabase } from '@examples/shared'
import { serve } from '@hono/node-server'
import { createScope, PoolTimeoutError, type TimeoutMessage } from '@scoped/core'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import { pgDriver } from '@scoped/pg'
import { Kysely, PostgresDialect } from 'kysely'
import pg from 'pg'
import Cursor from 'pg-cursor'
import { createApp } from '../hono-app/src/app.ts'
import { type Connect, createNaiveApp } from './naive-app.ts'
import { activity, describeActivity, queryOne, watchPool } from './observe.ts'
import { columns, out, outcomes, progressPrinter, seconds, table } from './report.ts'
import { drive, mix, plan, type TrafficResult } from './traffic.ts'
import { startWorker } from './worker-process.ts'

const REQUESTS = Number(process.env.DEMO_REQUESTS ?? 3000)
const CONCURRENCY = Number(process.env.DEMO_CONCURRENCY ?? 32)
const NAIVE_MS = Number(process.env.DEMO_NAIVE_SECONDS ?? 6) * 1000
const POOL_SIZE = 10
const NAIVE_CLIENT_TIMEOUT_MS = 2000
const SCOPED_ACQUIRE_TIMEOUT_MS = 1000

const started = performance.now()
const checks: [string, boolean][] = []
const check = (what: string, ok: boolean) => checks.push([what, ok])

/** Server-side errors by kind; the ones the traffic is meant to cause are expected. */
class ErrorTally {
  readonly counts = new Map<string, number>()
  unexpected: unknown
  record = (error: unknown) => {
    const e = error as { name?: string; code?: string; message?: string }
    const kind = e.code === '57014' ? 'statement cancelled (client left)' : (e.name ?? 'Error')
    this.counts.set(kind, (this.counts.get(kind) ?? 0) + 1)
    const expected =
      e.message?.includes('(simulated)') ||
      e.code === '57014' ||
      e.code === 'SCOPE_ABORTED' ||
      e.code === 'POOL_TIMEOUT' ||
      e.name === 'InvalidOrderError'
    if (!expected) this.unexpected ??= error
  }
}

function listen(fetch: Parameters<typeof serve>[0]['fetch']) {
  return new Promise<{ url: string; close(): Promise<void> }>((resolve) => {
    const server = serve({ fetch, hostname: '127.0.0.1', port: 0 }, (info: AddressInfo) => {
      resolve({
        url: `http://127.0.0.1:${info.port}`,
        close: () =>
          new Promise<void>((done) => {
            server.close(() => done())
            // Requests of the naive app wait for a connection that never comes: cut them.
            if ('closeAllConnections' in server) server.closeAllConnections()
          }),
      })
    })
  })
}

async function until(ok: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = performance.now() + timeoutMs
  while (!ok() && performance.now() < deadline) await sleep(10)
}

const count = (r: TrafficResult, o: string) => r.outcomes.get(o as never) ?? 0

out('scoped demo: request-scoped database sessions under load, then the leak they prevent')
out()

// ── PostgreSQL ──────────────────────────────────────────────────────────────
out('[1/4] PostgreSQL')
const database = await openDatabase((line) => out(`  ${line}`))
const scopedUrl = await database.createDatabase('scoped_demo')
const naiveUrl = await database.createDatabase('scoped_demo_naive')
out(
  `  databases scoped_demo and scoped_demo_naive ready (${seconds(performance.now() - started)} since start)`,
)
out()

// ── The scoped app and the worker ───────────────────────────────────────────
out(`[2/4] The orders service: Hono + @scoped/hono + @scoped/kysely, a pool of ${POOL_SIZE}`)
const pool = new pg.Pool({
  connectionString: scopedUrl,
  max: POOL_SIZE,
  application_name: 'orders-app',
})
const scope = createScope({
  driver: kyselyDriver(new PostgresDialect({ pool, cursor: Cursor }), { pool }),
  name: 'orders-db',
  acquireTimeoutMs: 10_000,
})
const db = scopedKysely<DB>(scope)
await scope.run(() => createSchema(db), { name: 'migrate' })
const appErrors = new ErrorTally()
const app = createApp({ scope, orders: createOrders(db), logError: appErrors.record })
const server = await listen(app.fetch)
const worker = await startWorker(scopedUrl, { BATCH: '20', INTERVAL_MS: '50' })
out(
  `  app on ${server.url}; worker ${worker.name} (loop(), FOR UPDATE SKIP LOCKED) in its own process`,
)
out(
  `  traffic: ${REQUESTS} requests, ${CONCURRENCY} at a time: ` +
    mix.map(([k, pct]) => `${pct}% ${k}`).join(', '),
)
const watchA = watchPool(pool, 'orders-db')
const a = await drive(server.url, plan(REQUESTS), {
  concurrency: CONCURRENCY,
  timeoutMs: 15_000,
  onProgress: progressPrinter('scoped', () => {
    const s = scope.stats()
    return `pool ${s.pool ? s.pool.total - s.pool.idle : s.holding}/${POOL_SIZE} in use, ${s.waiting} waiting`
  }),
})
watchA.stop()
// Responses are sent after COMMIT; the release follows at once. Give the last ones a moment.
await until(() => scope.stats().holding === 0 && pool.totalCount === pool.idleCount, 5_000)
const statsA = scope.stats()
const leftA = pool.totalCount - pool.idleCount
const activityA = await activity(scopedUrl, 'orders-app')
const rowsA = await queryOne<{ orders: number; halfway: number; processed: number }>(
  scopedUrl,
  `SELECT count(*) FILTER (WHERE customer NOT LIKE 'halfway-%')::int AS orders,
          count(*) FILTER (WHERE customer LIKE 'halfway-%')::int AS halfway,
          count(*) FILTER (WHERE status = 'processed')::int AS processed
     FROM orders`,
)
const workerExit = await worker.stop()
const activityWorker = await activity(scopedUrl, 'orders-worker')
const byWorker = await queryOne<{ n: number }>(
  scopedUrl,
  'SELECT count(*)::int AS n FROM orders WHERE processed_by = $1',
  [worker.name],
)
await server.close()
await app.dispose()
await scope.close()

const created = a.byKind.get('create')?.get('201') ?? 0
const failed = a.byKind.get('fail-halfway')?.get('500') ?? 0
const idleInTxA = activityA['idle in transaction'] ?? 0
out()
table([
  ['requests', `${a.done} in ${seconds(a.elapsedMs)}: ${outcomes(a.outcomes)}`],
  [
    'units of work',
    `${statsA.totals.committed} committed, ${statsA.totals.rolledBack} rolled back, ${statsA.totals.destroyed} connections destroyed (scope.stats())`,
  ],
  [
    'rows',
    `${rowsA.orders} orders for ${created} answers 201; ${rowsA.halfway} left by the ${failed} requests that failed half-way`,
  ],
  [
    'connections',
    `peak ${watchA.peakInUse} of ${POOL_SIZE} checked out, up to ${watchA.peakWaiting} requests waiting; ${leftA} left checked out`,
  ],
  ['pg_stat_activity', `orders-app: ${describeActivity(activityA)}`],
  [
    'worker',
    `${byWorker.n} orders processed (${worker.processed} reported after COMMIT); SIGTERM → exit code ${workerExit}, ` +
      `orders-worker: ${describeActivity(activityWorker)}`,
  ],
])
if (appErrors.unexpected) out(`    unexpected server error: ${String(appErrors.unexpected)}`)
const answeredOk = count(a, '201') + count(a, '200') + count(a, '404')
check(
  'one COMMIT per request answered 200/201/404, plus the migration (400s never touched the database)',
  statsA.totals.committed === answeredOk + 1,
)
check(
  'one ROLLBACK per 500, plus one per aborted request that had reached the database',
  statsA.totals.rolledBack >= count(a, '500') &&
    statsA.totals.rolledBack <= count(a, '500') + count(a, 'aborted'),
)
check(
  'every request answered (no client timeout)',
  count(a, 'gave-up') === 0 && count(a, 'network-error') === 0,
)
check(
  'one order row per 201, none from the requests that failed half-way',
  rowsA.orders === created && rowsA.halfway === 0,
)
check('no connection left checked out after the traffic', leftA === 0 && statsA.holding === 0)
check("no 'idle in transaction' backend", idleInTxA === 0)
check(
  'the worker finished its job and exited 0, leaving no connection',
  workerExit === 0 && Object.keys(activityWorker).length === 0,
)
check('the worker committed what it reported', byWorker.n === worker.processed)
check('no unexpected server error', appErrors.unexpected === undefined)
out()

// ── The naive app on a plain pg pool ─────────────────────────────────────────
out(
  '[3/4] The same traffic against a naive version: pool.connect() by hand, release() not in a finally',
)
{
  const k = new Kysely<DB>({
    dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: naiveUrl, max: 1 }) }),
  })
  await k.transaction().execute((trx) => createSchema(trx))
  await k.destroy()
}
const naivePool = new pg.Pool({
  connectionString: naiveUrl,
  max: POOL_SIZE,
  application_name: 'naive-app',
})
// Demo hygiene, not part of the naive code: when the demo stops the server, the leaked
// clients' sockets fail, and an 'error' with no listener would crash the process.
naivePool.on('connect', (client) => client.on('error', () => {}))
const naiveErrors = new ErrorTally()
const naiveServer = await listen(
  createNaiveApp(() => naivePool.connect(), naiveErrors.record).fetch,
)
out(
  `  same ${REQUESTS} requests, ${CONCURRENCY} at a time; the client gives up after ${seconds(NAIVE_CLIENT_TIMEOUT_MS)}; ` +
    `stopped after ${seconds(NAIVE_MS)}`,
)
const watchB = watchPool(naivePool)
const b = await drive(naiveServer.url, plan(REQUESTS), {
  concurrency: CONCURRENCY,
  timeoutMs: NAIVE_CLIENT_TIMEOUT_MS,
  deadlineMs: NAIVE_MS,
  onProgress: progressPrinter('naive ', () => {
    return `pool ${naivePool.totalCount - naivePool.idleCount}/${POOL_SIZE} in use, ${naivePool.waitingCount} waiting`
  }),
})
watchB.stop()
const leftB = naivePool.totalCount - naivePool.idleCount
const waitingB = naivePool.waitingCount
const activityB = await activity(naiveUrl, 'naive-app')
const idleInTxB = activityB['idle in transaction'] ?? 0
await naiveServer.close()
out()
table([
  ['requests', `${b.done - count(b, 'not-sent')} sent: ${outcomes(b.outcomes)}`],
  [
    'connections',
    `${leftB} of ${POOL_SIZE} checked out and never released; ${waitingB} requests still waiting (pg.Pool waits forever by default)`,
  ],
  ['pg_stat_activity', `naive-app: ${describeActivity(activityB)}`],
  [
    'who holds them?',
    'nothing in the process can say: pg.Pool does not know who checked a client out',
  ],
])
check('the naive pool ran dry (the leak is real)', leftB === POOL_SIZE && idleInTxB > 0)
out()

// ── The same naive code, its checkouts through a scope ───────────────────────
out(
  `[4/4] The same naive code, checking out through a scope (acquireTimeoutMs ${SCOPED_ACQUIRE_TIMEOUT_MS}) and never ending it`,
)
const naiveScopedPool = new pg.Pool({
  connectionString: naiveUrl,
  max: POOL_SIZE,
  application_name: 'naive-app-scoped',
})
const naiveScope = createScope({
  driver: pgDriver(naiveScopedPool),
  name: 'naive-orders',
  default: false,
  transaction: 'none', // the naive code sends its own BEGIN/COMMIT
  acquireTimeoutMs: SCOPED_ACQUIRE_TIMEOUT_MS,
  captureStacks: true,
  leakDetectionMs: 0,
})
let firstTimeout: PoolTimeoutError | undefined
const onTimeout = (m: unknown) => {
  const msg = m as TimeoutMessage
  if (msg.scope === 'naive-orders' && msg.error instanceof PoolTimeoutError)
    firstTimeout ??= msg.error
}
dc.subscribe('scoped:timeout', onTimeout)
// What an adapter does, minus the `finally`: open a scope per request, end it on the happy path only.
const connectThroughScope: Connect = async function connectThroughScope(name) {
  const open = naiveScope.open({ name, kind: 'request' })
  const client = await open.session.connection()
  return {
    query: (text, values) => client.query(text, values),
    release: () => void open.end({ commit: false }),
  }
}
const naiveScopedErrors = new ErrorTally()
const naiveScopedServer = await listen(
  createNaiveApp(connectThroughScope, naiveScopedErrors.record).fetch,
)
const c = await drive(naiveScopedServer.url, plan(REQUESTS), {
  concurrency: CONCURRENCY,
  timeoutMs: NAIVE_CLIENT_TIMEOUT_MS,
  deadlineMs: NAIVE_MS,
  onProgress: progressPrinter('naive+scope', () => {
    const s = naiveScope.stats()
    return `pool ${s.pool ? s.pool.total - s.pool.idle : s.holding}/${POOL_SIZE} in use, ${s.waiting} waiting`
  }),
})
dc.unsubscribe('scoped:timeout', onTimeout)
const statsC = naiveScope.stats()
const holdersC = naiveScope.holders()
const activityC = await activity(naiveUrl, 'naive-app-scoped')
await naiveScopedServer.close()
// close() waits for open scopes up to timeoutMs, then destroys the connections they still hold.
await naiveScope.close({ timeoutMs: 0 })
const statsClosed = naiveScope.stats()
// The destroyed clients' backends exit as their sockets close: look until they are gone.
let activityClosed = await activity(naiveUrl, 'naive-app-scoped')
for (let i = 0; i < 40 && Object.keys(activityClosed).length > 0; i++) {
  await sleep(50)
  activityClosed = await activity(naiveUrl, 'naive-app-scoped')
}
const timeouts = naiveScopedErrors.counts.get('PoolTimeoutError') ?? 0
out()
table([
  ['requests', `${c.done - count(c, 'not-sent')} sent: ${outcomes(c.outcomes)}`],
  [
    'connections',
    `${statsC.holding} of ${POOL_SIZE} held by sessions that never ended; ${timeouts} requests failed with PoolTimeoutError after ${seconds(SCOPED_ACQUIRE_TIMEOUT_MS)} instead of hanging`,
  ],
  ['pg_stat_activity', `naive-app-scoped: ${describeActivity(activityC)}`],
  [
    'scope.close()',
    `destroyed the ${statsClosed.totals.forced} connections still held; pg_stat_activity now: ${describeActivity(activityClosed)}`,
  ],
])
if (firstTimeout) {
  out()
  out(
    "  The first PoolTimeoutError's message: who holds the connections, by route, for how long, and from where",
  )
  out("  ('idle': no statement running; PostgreSQL sees them 'idle in transaction'):")
  out()
  for (const line of firstTimeout.message.split('\n')) out(`    │ ${line}`)
  // The site is the first frame outside the library; the whole acquisition stack is there too.
  const leaked =
    firstTimeout.holders.find((h) => h.name.includes('fail-halfway')) ?? firstTimeout.holders[0]
  const frames =
    leaked?.stack
      ?.split('\n')
      .map((l) => l.trim())
      .filter((l) => l.startsWith('at ')) ?? []
  if (leaked && frames.length > 0) {
    out()
    out(`  and the acquisition stack of '${leaked.name}' (holders()[i].stack):`)
    for (const frame of frames.slice(0, 4)) out(`    │ ${frame}`)
  }
}
check(
  'the error names the holders',
  firstTimeout !== undefined && firstTimeout.holders.length === POOL_SIZE,
)
check('scope.close() reclaimed every leaked connection', Object.keys(activityClosed).length === 0)
out()

// ── Side by side ───────────────────────────────────────────────────────────────
const answered = (r: TrafficResult) =>
  [...r.outcomes].filter(([o]) => /^\d+$/.test(o)).reduce((n, [, v]) => n + v, 0)
const sent = (r: TrafficResult) => r.done - count(r, 'not-sent')
out('Side by side')
columns(
  ['', 'scoped middleware', 'naive pool.connect()', 'naive, through a scope'],
  [
    [
      'requests sent',
      `${sent(a)}`,
      `${sent(b)} (stopped at ${seconds(NAIVE_MS)})`,
      `${sent(c)} (stopped at ${seconds(NAIVE_MS)})`,
    ],
    ['answered', `${answered(a)}`, `${answered(b)}`, `${answered(c)}`],
    [
      'aborted by the client (on purpose)',
      `${count(a, 'aborted')}`,
      `${count(b, 'aborted')}`,
      `${count(c, 'aborted')}`,
    ],
    [
      'client gave up waiting',
      `${count(a, 'gave-up')}`,
      `${count(b, 'gave-up')}`,
      `${count(c, 'gave-up')}`,
    ],
    [
      'connections left checked out',
      `${leftA} of ${POOL_SIZE}`,
      `${leftB} of ${POOL_SIZE}`,
      `${statsC.holding} of ${POOL_SIZE} → 0 after scope.close()`,
    ],
    [
      "'idle in transaction' backends",
      `${idleInTxA}`,
      `${idleInTxB}`,
      `${activityC['idle in transaction'] ?? 0} → ${activityClosed['idle in transaction'] ?? 0}`,
    ],
    [
      'who holds the connections',
      'nobody, at rest',
      'unknown',
      `named in PoolTimeoutError, holders(): ${holdersC.length}`,
    ],
  ],
)
out()

const ok = checks.every(([, passed]) => passed)
out('Checks')
for (const [what, passed] of checks) out(`  ${passed ? '✓' : '✗'} ${what}`)
out()

if (process.env.DEMO_REPORT_JSON) {
  const plain = (m: Map<string, number>) => Object.fromEntries(m)
  await writeFile(
    process.env.DEMO_REPORT_JSON,
    JSON.stringify(
      {
        requests: REQUESTS,
        poolSize: POOL_SIZE,
        scoped: {
          outcomes: plain(a.outcomes),
          created,
          failedHalfway: failed,
          committed: statsA.totals.committed,
          rolledBack: statsA.totals.rolledBack,
          peakInUse: watchA.peakInUse,
          peakWaiting: watchA.peakWaiting,
          leftCheckedOut: leftA,
          activity: activityA,
          rows: rowsA,
          worker: {
            exitCode: workerExit,
            reported: worker.processed,
            processed: byWorker.n,
            activity: activityWorker,
          },
        },
        naive: {
          outcomes: plain(b.outcomes),
          leftCheckedOut: leftB,
          waiting: waitingB,
          activity: activityB,
        },
        naiveScoped: {
          outcomes: plain(c.outcomes),
          poolTimeouts: timeouts,
          holding: statsC.holding,
          holders: holdersC.map((h) => h.name),
          firstTimeout: firstTimeout?.message,
          forced: statsClosed.totals.forced,
          activity: activityC,
          activityAfterClose: activityClosed,
        },
        checks: Object.fromEntries(checks),
        elapsedMs: Math.round(performance.now() - started),
      },
      null,
      2,
    ),
  )
}

// The naive pool's leaked connections would outlive everything: end them on the server.
await queryOne(
  naiveUrl,
  "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'naive-app'",
)
await database.stop()
out(
  `${ok ? 'All checks passed' : 'SOME CHECKS FAILED'} in ${seconds(performance.now() - started)}; ${database.embedded ? 'the embedded PostgreSQL is stopped' : 'done'}.`,
)
// The naive pool still holds its leaked clients and waiters: nothing would end it. Exit.
process.exit(ok ? 0 : 1)
