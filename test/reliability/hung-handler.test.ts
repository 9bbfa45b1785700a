/**
 * A handler that never settles, with maxHoldMs: its connection is destroyed at
 * the limit, the pool does not run dry, the leak warning names the route and
 * the acquisition site, and the handler's later statement fails with
 * SessionClosedError. See scenarios/hung-handler.ts.
 */
import { describe, it } from 'vitest'
import { hungHandler } from './scenarios/hung-handler.ts'
import { adapters } from './support/apps.ts'
import { size } from './support/report.ts'

describe.each(adapters)('hung handler through %s', (adapter) => {
  it('maxHoldMs destroys the hung connections, queued requests are served, the late statement throws SessionClosedError', () =>
    hungHandler(adapter, { waiting: size(10, 100) }))
})
