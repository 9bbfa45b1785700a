/**
 * Hung handler: two handlers that never settle hold the whole pool (max 2).
 * With `maxHoldMs`, their connections are destroyed at the limit, so the
 * requests queued behind them are served; the leak warning before that names
 * the route and where the connection was checked out; and when a hung handler
 * wakes up, its next statement fails with `SessionClosedError`.
 */
import { SessionClosedError } from '@scoped/core'
import { expect } from 'vitest'
import { independentQuery } from '../../support/db.ts'
import { type Adapter, lateStatementSucceeded, startApp } from '../support/apps.ts'
import { leaks, leakTotal, until } from '../support/checks.ts'
import { harness } from '../support/harness.ts'
import { runLoad } from '../support/load.ts'
import { record } from '../support/report.ts'

export async function hungHandler(adapter: Adapter, o: { waiting: number }): Promise<void> {
  const started = performance.now()
  const maxHoldMs = 600
  const h = await harness(`rel_hung_${adapter}`, {
    max: 2,
    scope: { maxHoldMs, leakDetectionMs: 200, captureStacks: true, acquireTimeoutMs: 10_000 },
  })
  const wake: (() => void)[] = []
  const late = new Map<string, unknown>()
  const app = await startApp(adapter, {
    scope: h.scope,
    db: h.db,
    hang: () => new Promise<void>((resolve) => wake.push(resolve)),
    late: (id, e) => late.set(id, e),
  })
  // Two hung handlers take both connections…
  const hung = runLoad(app.server, {
    port: app.port,
    total: 2,
    concurrency: 2,
    mix: [['hang', 1]],
    seed: 1,
    prefix: 'hung',
  })
  await until('both hung handlers hold a connection', () => h.scope.stats().holding === 2)
  // …and requests queue behind them: they are served once maxHoldMs destroys the hung ones' connections.
  const queued = await runLoad(app.server, {
    port: app.port,
    total: o.waiting,
    concurrency: Math.min(o.waiting, 20),
    mix: [['ok', 1]],
    seed: 2,
    prefix: 'queued',
  })
  // Each hung connection is taken maxHoldMs after its own checkout. On a loaded machine the
  // second checkout can come well after the first, and the first one's replacement connection
  // can serve every queued request before then: a handler woken now would still hold its
  // connection, and its late statement would rightly succeed. Wake them once both were taken.
  await until('maxHoldMs took both hung connections', () => h.scope.stats().totals.forced >= 2)
  const forcedBeforeWake = h.scope.stats().totals.forced
  // The hung handlers wake up and try one more statement.
  await until('both hung handlers are waiting', () => wake.length === 2)
  for (const w of wake) w()
  const hungResult = await hung
  await until('both woken handlers tried their late statement', () => late.size === 2)

  const problems: string[] = []
  let served = 0
  for (let i = 0; i < queued.sent; i++) if (queued.client[i] === 200) served++
  if (served !== o.waiting) problems.push(`${o.waiting - served} queued requests were not served`)
  if (forcedBeforeWake !== 2)
    problems.push(`${forcedBeforeWake} connections taken by maxHoldMs, expected 2`)
  for (const [id, e] of late) {
    if (e === lateStatementSucceeded)
      problems.push(`${id}: the late statement succeeded; it should throw SessionClosedError`)
    else if (!(e instanceof SessionClosedError))
      problems.push(`${id}: the late statement failed with ${String(e)}`)
    else if (!/maxHoldMs/.test(e.message))
      problems.push(`${id}: SessionClosedError does not say maxHoldMs: ${e.message}`)
  }
  const leakWarnings = h.warnings.filter((w) => w.includes('Possible connection leak'))
  if (leakWarnings.length < 2)
    problems.push(`${leakWarnings.length} leak warnings, expected one per hung handler`)
  for (const w of leakWarnings) {
    if (!w.includes("'POST /unit/:kind/:id'"))
      problems.push(`leak warning does not name the route: ${w.split('\n')[0]}`)
    if (!/Acquired at:[\s\S]*test\/reliability\/support\/apps\.ts/.test(w)) {
      problems.push(`leak warning does not show the acquisition site: ${w.slice(0, 300)}`)
    }
  }
  const hungStatuses = [...hungResult.client]
  if (hungStatuses.some((s) => s === 200))
    problems.push(`a hung handler answered 200: ${hungStatuses}`)
  const leak = await leaks(h.url, h.scope, h.pool)
  if (leakTotal(leak) > 0) problems.push(`leaked: ${JSON.stringify(leak)}`)
  // The hung units never committed anything; the queued ones all did.
  const rows = await independentQuery<{ id: string }>(h.url, 'SELECT DISTINCT id FROM units')
  const hungRows = rows.filter((r) => r.id.startsWith('hung')).length
  const queuedRows = rows.filter((r) => r.id.startsWith('queued')).length
  if (hungRows > 0) problems.push(`${hungRows} hung units committed rows`)
  if (queuedRows !== served)
    problems.push(`${queuedRows} queued units committed, ${served} answered`)
  const stats = h.scope.stats()
  await app.close()
  await h.close()

  record({
    scenario: 'hung handler',
    adapter,
    load: `2 handlers that never settle hold a pool of 2; ${o.waiting} requests queued behind them, ${served} served`,
    faults: `handlers hang after their first statement; maxHoldMs ${maxHoldMs}, leakDetectionMs 200: ${stats.totals.forced} connections destroyed at the limit, ${leakWarnings.length} leak warnings naming the route and site`,
    failed: hungStatuses.filter((s) => s !== 200).length + (o.waiting - served),
    why: `the 2 hung requests (statuses ${hungStatuses.join(', ')}): their late statement threw ${[...late.values()].map((e) => (e === lateStatementSucceeded ? 'nothing' : (e as Error).name)).join(', ')}`,
    leaked: leakTotal(leak),
    lost: hungRows + Math.abs(queuedRows - served),
    durationMs: performance.now() - started,
    problems,
  })
  expect(problems).toEqual([])
}
