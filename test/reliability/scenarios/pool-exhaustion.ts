/**
 * Pool exhaustion: 200 concurrent requests with a slow query each against a
 * pool of 5. Requests wait their turn; none fails before `acquireTimeoutMs`;
 * the ones still waiting then get a `PoolTimeoutError` that lists the 5
 * holders by route; and once the load stops, the pool serves again at once.
 */
import { PoolTimeoutError } from '@scoped/core'
import { expect } from 'vitest'
import { type Adapter, startApp } from '../support/apps.ts'
import { checkUnits, leaks, leakTotal, lostCount, unitProblems } from '../support/checks.ts'
import { harness } from '../support/harness.ts'
import { CommitLedger, runLoad } from '../support/load.ts'
import { record } from '../support/report.ts'

export async function poolExhaustion(
  adapter: Adapter,
  o: { requests: number; slowMs: number; acquireTimeoutMs: number },
): Promise<void> {
  const started = performance.now()
  const h = await harness(`rel_exhaust_${adapter}`, {
    max: 5,
    scope: { acquireTimeoutMs: o.acquireTimeoutMs, captureStacks: true },
  })
  const errors: { id: string; error: unknown }[] = []
  const ledger = new CommitLedger()
  const app = await startApp(adapter, {
    scope: h.scope,
    db: h.db,
    onCommit: (id) => ledger.note(id),
    onError: (id, error) => errors.push({ id, error }),
  })
  const load = await runLoad(app.server, {
    port: app.port,
    total: o.requests,
    concurrency: o.requests,
    mix: [['slow', 1]],
    slowMs: o.slowMs,
    seed: 5,
    prefix: 'x',
    ledger,
  })
  const problems: string[] = []
  let answered = 0
  let timedOut = 0
  let earliestFailure = Number.POSITIVE_INFINITY
  for (let i = 0; i < load.sent; i++) {
    const c = load.client[i]!
    if (c === 200) answered++
    else {
      timedOut++
      earliestFailure = Math.min(earliestFailure, load.durationMs[i]!)
      if (!load.reasonAt(i)?.includes('POOL_TIMEOUT'))
        problems.push(`${load.idOf(i)} failed with ${c}: ${load.reasonAt(i)}`)
    }
  }
  // A timer never fires early: a request that failed did so after waiting acquireTimeoutMs.
  if (earliestFailure < o.acquireTimeoutMs) {
    problems.push(
      `a request failed after ${Math.round(earliestFailure)} ms, before acquireTimeoutMs ${o.acquireTimeoutMs}`,
    )
  }
  if (timedOut === 0) problems.push('no request timed out: the pool was not exhausted')
  if (answered === 0) problems.push('no request was answered')
  let holdersListed = 0
  for (const { id, error } of errors) {
    if (!(error instanceof PoolTimeoutError)) {
      problems.push(`${id}: ${String(error)}`)
      continue
    }
    // Every holder is named by route, with where it checked the connection out.
    const named = error.holders.filter(
      (x) => x.name === 'POST /unit/:kind/:id' && x.site?.includes('apps.ts'),
    )
    if (error.holders.length !== 5 || named.length !== 5) {
      problems.push(
        `${id}: PoolTimeoutError lists ${error.holders.length} holders (${named.length} named with a site)`,
      )
    } else if (
      !error.message.includes("'POST /unit/:kind/:id'") ||
      !error.message.includes('acquired at')
    ) {
      problems.push(`${id}: the message does not list the holders: ${error.message.slice(0, 200)}`)
    } else holdersListed++
  }
  if (errors.length !== timedOut)
    problems.push(`${errors.length} errors reached the app for ${timedOut} failures`)
  // The system recovers: the next requests are all served.
  const after = await runLoad(app.server, {
    port: app.port,
    total: 50,
    concurrency: 10,
    mix: [['ok', 1]],
    seed: 6,
    prefix: 'y',
  })
  const afterOk = [...after.client].filter((c) => c === 200).length
  if (afterOk !== 50) problems.push(`${50 - afterOk} requests failed after the load stopped`)
  const leak = await leaks(h.url, h.scope, h.pool)
  if (leakTotal(leak) > 0) problems.push(`leaked: ${JSON.stringify(leak)}`)
  const units = await checkUnits(h.url, load, 'x')
  problems.push(...unitProblems(units).slice(0, 10))
  const sample = errors.find((e) => e.error instanceof PoolTimeoutError)?.error as Error | undefined
  await app.close()
  await h.close()

  record({
    scenario: 'pool exhaustion',
    adapter,
    load: `${o.requests} concurrent requests, each ${o.slowMs} ms in pg_sleep, pool of 5, acquireTimeoutMs ${o.acquireTimeoutMs}; ${answered} answered; then 50 more: ${afterOk} answered`,
    faults: 'demand far above the pool',
    failed: timedOut,
    why: `PoolTimeoutError, earliest after ${Math.round(earliestFailure)} ms, ${holdersListed} listing all 5 holders by route and site${sample ? ` ("${sample.message.split('\n')[0]}")` : ''}`,
    leaked: leakTotal(leak),
    lost: lostCount(units),
    durationMs: performance.now() - started,
    problems,
  })
  expect(problems).toEqual([])
}
