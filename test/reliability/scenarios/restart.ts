/**
 * Server restart: PostgreSQL (an embedded server of this scenario's own) is
 * stopped mid-load for 3 s and started again, with the same data directory.
 *
 * - While it is down, requests fail fast with a clear error (a refused
 *   connection), none hangs past `acquireTimeoutMs`.
 * - Once it is up again, every request started after that succeeds: the app
 *   was not restarted, and no stale client (one connected to the old server)
 *   is handed out; `validateIdleMs` checks clients that sat idle.
 * - Nothing leaks; committed units match answered requests.
 */
import { expect } from 'vitest'
import type { Database } from '../../../scripts/embedded-db.ts'
import { independentQuery } from '../../support/db.ts'
import { type Adapter, startApp, unitsTable } from '../support/apps.ts'
import { checkUnits, leaks, leakTotal, lostCount, unitProblems } from '../support/checks.ts'
import { harness } from '../support/harness.ts'
import { ABORTED, CommitLedger, NET_ERROR, runLoad } from '../support/load.ts'
import { record } from '../support/report.ts'

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

export async function restart(
  adapter: Adapter,
  server: Database,
  o: { downMs: number; beforeMs: number; afterMs: number; acquireTimeoutMs: number },
): Promise<void> {
  const started = performance.now()
  const url = await server.createDatabase(`rel_restart_${adapter}`)
  await independentQuery(url, unitsTable)
  const h = await harness(`rel_restart_${adapter}`, {
    url,
    max: 8,
    driver: { validateIdleMs: 200 },
    scope: { acquireTimeoutMs: o.acquireTimeoutMs },
  })
  const ledger = new CommitLedger()
  const app = await startApp(adapter, {
    scope: h.scope,
    db: h.db,
    onCommit: (id) => ledger.note(id),
  })
  const stop = new AbortController()
  const load = runLoad(app.server, {
    port: app.port,
    total: 1_000_000,
    concurrency: 16,
    // Mostly quick units, some slow ones, so statements are in flight when the server stops.
    mix: [
      ['ok', 90],
      ['slow', 10],
    ],
    slowMs: 30,
    seed: 3,
    ledger,
    signal: stop.signal,
  })
  await sleep(o.beforeMs)
  const downAt = performance.now()
  await server.server!.stop()
  const down = performance.now()
  await sleep(o.downMs)
  const upAt = performance.now()
  await server.server!.start()
  const up = performance.now()
  await sleep(o.afterMs)
  stop.abort()
  const r = await load

  const problems: string[] = []
  let whileDown = 0
  let failedWhileDown = 0
  let slowestFailure = 0
  let afterUp = 0
  const failedAfterUp: string[] = []
  const reasonsDown = new Map<string, number>()
  for (let i = 0; i < r.sent; i++) {
    const t = r.startedAt[i]!
    const c = r.client[i]!
    const failed = c >= 500 || c === NET_ERROR || c === ABORTED
    if (failed) slowestFailure = Math.max(slowestFailure, r.durationMs[i]!)
    if (t >= down && t + r.durationMs[i]! <= upAt) {
      whileDown++
      if (failed) {
        failedWhileDown++
        const why = r.reasonAt(i) ?? `${c}`
        reasonsDown.set(why, (reasonsDown.get(why) ?? 0) + 1)
      }
    }
    if (t >= up) {
      afterUp++
      if (c !== 200) failedAfterUp.push(`${r.idOf(i)} got ${c}: ${r.reasonAt(i)}`)
    }
  }
  if (whileDown === 0) problems.push('no request ran while the server was down')
  if (failedWhileDown !== whileDown)
    problems.push(`${whileDown - failedWhileDown} requests succeeded while the server was down`)
  // A failure must come within the acquire timeout (plus slack for a loaded machine), never hang.
  if (slowestFailure > o.acquireTimeoutMs + 2_000) {
    problems.push(
      `a failing request took ${Math.round(slowestFailure)} ms (acquireTimeoutMs ${o.acquireTimeoutMs})`,
    )
  }
  for (const why of reasonsDown.keys()) {
    if (!/ECONNREFUSED|terminat|connection|starting up|shutting down/i.test(why)) {
      problems.push(`unclear error while the server was down: ${why}`)
    }
  }
  if (afterUp < 50) problems.push(`only ${afterUp} requests after the restart`)
  problems.push(...failedAfterUp.slice(0, 5).map((f) => `after the restart: ${f}`))
  const leak = await leaks(url, h.scope, h.pool)
  if (leakTotal(leak) > 0) problems.push(`leaked: ${JSON.stringify(leak)}`)
  const units = await checkUnits(url, r, 'u')
  problems.push(...unitProblems(units).slice(0, 10))
  let failed = 0
  for (let i = 0; i < r.sent; i++) if (r.client[i] !== 200) failed++
  await app.close()
  await h.close()

  record({
    scenario: 'server restart',
    adapter,
    load: `${r.sent.toLocaleString('en')} requests, 16 connections, pool 8 (acquireTimeoutMs ${o.acquireTimeoutMs}, validateIdleMs 200); ${whileDown} while down, ${afterUp} after the restart (${afterUp - failedAfterUp.length} answered 200)`,
    faults: `PostgreSQL stopped (fast shutdown) for ${Math.round(upAt - downAt)} ms, started again on the same data directory`,
    failed,
    why: `${failedWhileDown} while down: ${[...reasonsDown.entries()].map(([k, n]) => `${n}× ${k}`).join('; ')}; slowest failure ${Math.round(slowestFailure)} ms; ${failed - failedWhileDown} in flight at the stop or start`,
    leaked: leakTotal(leak),
    lost: lostCount(units),
    durationMs: performance.now() - started,
    problems,
  })
  expect(problems).toEqual([])
}
