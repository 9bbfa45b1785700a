/**
 * The soak, while a random in-use backend is terminated every 100 ms: the
 * process keeps serving, only the requests on a killed backend fail (each with
 * a connection error), dead clients are destroyed, the pool refills, and the
 * soak's checks hold. See scenarios/soak.ts.
 */
import { describe, it } from 'vitest'
import { soak } from './scenarios/soak.ts'
import { adapters } from './support/apps.ts'
import { size } from './support/report.ts'

describe.each(adapters)('backend kills through %s', (adapter) => {
  const total = size(1_000, 30_000)
  it(
    `${total} requests while pg_terminate_backend hits a random in-use backend every 100 ms`,
    () =>
      soak(adapter, {
        total,
        kills: { everyMs: 100 },
        maxHeapPerK: size(8 * 1024 * 1024, 32 * 1024),
      }),
    size(120_000, 1_800_000),
  )
})
