/**
 * SIGTERM while 50 requests and a worker loop are in flight, in a child
 * process: in-flight units finish and commit, new ones are refused, the pool
 * ends, exit code 0, nothing half-committed. See scenarios/graceful-shutdown.ts.
 */
import { describe, it } from 'vitest'
import { gracefulShutdown } from './scenarios/graceful-shutdown.ts'
import { adapters } from './support/apps.ts'

describe.each(adapters)('graceful shutdown of a %s app', (adapter) => {
  it('SIGTERM with 50 requests and a worker in flight: all commit, new ones refused, exit 0', () =>
    gracefulShutdown(adapter, { requests: 50, slowMs: 500 }))
})
