/**
 * 200 concurrent slow requests against a pool of 5: they wait, none fails
 * before acquireTimeoutMs, the ones that time out get a PoolTimeoutError
 * listing the holders, and the pool serves again when the load stops. See
 * scenarios/pool-exhaustion.ts.
 */
import { describe, it } from 'vitest'
import { poolExhaustion } from './scenarios/pool-exhaustion.ts'
import { adapters } from './support/apps.ts'
import { size } from './support/report.ts'

describe.each(adapters)('pool exhaustion through %s', (adapter) => {
  it('200 concurrent slow requests on a pool of 5: wait, then PoolTimeoutError naming the holders; recovers', () =>
    poolExhaustion(adapter, {
      requests: 200,
      slowMs: size(100, 250),
      acquireTimeoutMs: size(2_000, 5_000),
    }))
})
