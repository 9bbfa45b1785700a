/**
 * The acquisition site (`captureStacks`) names the application's code even when
 * a query builder's own frames come between it and the checkout: V8 keeps only
 * 10 frames by default, and Kysely → `scopedKysely` → `Session.use()` alone is
 * deeper than that.
 */

import vm from 'node:vm'
import { afterEach, describe, expect, it } from 'vitest'
import { createScope, type Scope, type Session } from '../src/index.ts'
import { type FakeConn, FakeDriver } from './fake-driver.ts'

// A query builder's frames: 12 synchronous calls, in a file under node_modules/ as a real
// builder's are, ending in `session.use()`.
const builder = vm.runInThisContext(
  '(function build(depth, session, fn) { return depth === 0 ? session.use(fn) : build(depth - 1, session, fn) })',
  { filename: '/app/node_modules/kysely/dist/esm/query-builder.js' },
) as (
  depth: number,
  session: Session<FakeConn>,
  fn: (c: FakeConn) => Promise<unknown>,
) => Promise<unknown>

const scopes: Scope<FakeConn>[] = []
const defaultLimit = Error.stackTraceLimit
afterEach(async () => {
  Error.stackTraceLimit = defaultLimit
  await Promise.all(scopes.splice(0).map((s) => s.close({ timeoutMs: 100 })))
})

describe('acquisition site behind a deep query builder', () => {
  it("names the application's function, not the library's checkout, with V8's default 10 frames", async () => {
    Error.stackTraceLimit = 10
    const driver = new FakeDriver()
    const scope = createScope({ driver, default: false, captureStacks: true, name: 'site' })
    scopes.push(scope)
    let site: string | undefined
    let stack: string | undefined
    async function loadOrderReport() {
      return builder(12, scope.getSession(), async () => {
        ;({ site, stack } = scope.holders()[0]!)
      })
    }
    await scope.run(loadOrderReport, { name: 'GET /orders/summary' })
    expect(site).toMatch(/^loadOrderReport \(.*acquire-site\.test\.ts:\d+:\d+\)$/)
    expect(stack).toContain('loadOrderReport')
    expect(stack).not.toContain('query-builder.js')
    // Raised for the capture only: the application's own limit is back.
    expect(Error.stackTraceLimit).toBe(10)
  })

  it('keeps a higher limit the application set', async () => {
    Error.stackTraceLimit = 200
    const scope = createScope({ driver: new FakeDriver(), default: false, captureStacks: true })
    scopes.push(scope)
    await scope.run(() => scope.getSession().use(async () => undefined))
    expect(Error.stackTraceLimit).toBe(200)
  })
})
