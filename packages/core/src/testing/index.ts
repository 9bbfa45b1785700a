/**
 * Helpers for your own test suites.
 *
 * ```ts
 * import { withRollback, expectNoLeaks } from '@scoped/core/testing'
 *
 * it('creates an order', () => withRollback(scope, async () => {
 *   await createOrder({ sku: 'A-1' })                 // your code, using getSession() as in production
 *   expect(await countOrders()).toBe(1)               // sees its own writes
 * }))                                                // …and leaves nothing behind
 *
 * afterEach(() => expectNoLeaks(scope))
 * ```
 */
import type { Holder } from '../holders.js'
import type { Scope } from '../scope.js'

const rollback = Symbol('withRollback')

/**
 * Run `fn` in a new scope whose unit of work is ALWAYS rolled back, so each
 * test starts from the same data (as Django's `TestCase`). The transaction is
 * opened first, so `transaction(fn)` calls in the code under test become
 * savepoints and an explicit `commit()` throws `TransactionStateError` instead
 * of committing. Work in a nested `runJob()` has its own session and is NOT
 * rolled back; neither is work done through other connections (e.g. an HTTP
 * request to your app, which runs in the request's own scope).
 */
export async function withRollback<C, T>(
  scope: Scope<C>,
  fn: () => Promise<T>,
  opts: { name?: string } = {},
): Promise<T> {
  if (typeof fn !== 'function')
    throw new TypeError(`withRollback(scope, fn): fn must be a function, got ${typeof fn}`)
  let result: T | undefined
  try {
    await scope.run(
      () =>
        scope.getSession().transaction(async () => {
          result = await fn()
          throw rollback
        }),
      { name: opts.name ?? 'test:withRollback' },
    )
  } catch (e) {
    if (e !== rollback) throw e
  }
  return result as T
}

export interface NoLeaksOptions {
  /** Wait up to this long for connections to come back (an HTTP adapter releases on the response's close). Default 1000. */
  timeoutMs?: number
  /** Also require the driver's pool to be fully idle (nothing checked out by anyone). Default true. */
  pool?: boolean
}

/**
 * Resolve once no session of `scope` holds a connection (and, with `pool`, the
 * pool is fully idle); otherwise throw an error listing every holder: name,
 * held-for time, state and acquisition site.
 */
export async function expectNoLeaks<C>(scope: Scope<C>, opts: NoLeaksOptions = {}): Promise<void> {
  const timeoutMs = opts.timeoutMs ?? 1000
  const checkPool = opts.pool ?? true
  const deadline = performance.now() + timeoutMs
  for (;;) {
    const holders = scope.holders()
    const pool = scope.stats().pool
    const poolBusy = checkPool && pool ? pool.total - pool.idle : 0
    if (holders.length === 0 && poolBusy === 0) return
    if (performance.now() >= deadline) throw leakError(scope.name, holders, poolBusy, timeoutMs)
    await new Promise((r) => setTimeout(r, 10))
  }
}

function leakError(name: string, holders: Holder[], poolBusy: number, timeoutMs: number): Error {
  const lines = holders.map(
    (h) =>
      `  - '${h.name}' (${h.id}) held ${h.heldMs} ms, ${h.state}${h.site ? `, acquired at ${h.site}` : ''}`,
  )
  const outside = poolBusy - holders.length
  if (outside > 0)
    lines.push(`  - ${outside} connection(s) checked out of the pool outside any session`)
  return new Error(
    `expectNoLeaks: scope '${name}' still holds connections after ${timeoutMs} ms:\n${lines.join('\n')}\n` +
      'Fix: await the work that uses them, or look at the acquisition sites above (captureStacks: true shows them).',
  )
}
