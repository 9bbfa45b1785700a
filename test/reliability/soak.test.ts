/**
 * Soak through each adapter: the brief's mix of endings at 64 concurrent
 * connections. Short here (`pnpm test`); 100,000 requests per adapter in the
 * long run (`pnpm test:reliability`). See scenarios/soak.ts for the checks.
 */
import { describe, it } from 'vitest'
import { soak } from './scenarios/soak.ts'
import { adapters } from './support/apps.ts'
import { size } from './support/report.ts'

describe.each(adapters)('soak through %s', (adapter) => {
  const total = size(1_500, 100_000)
  it(
    `${total} requests, 64 connections: nothing checked out or idle in transaction, commits = 2xx/4xx answers, heap flat`,
    () => soak(adapter, { total, maxHeapPerK: size(8 * 1024 * 1024, 16 * 1024) }),
    size(120_000, 1_800_000),
  )
})
