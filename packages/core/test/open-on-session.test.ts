/**
 * `scope.open({ onSession })`: the adapter hook called when the scope makes a
 * session, so an adapter can watch for client aborts only in scopes that use
 * the database.
 */
import { afterEach, describe, expect, it } from 'vitest'
import { createScope, type Scope, ScopeAbortedError } from '../src/index.ts'
import { type FakeConn, FakeDriver } from './fake-driver.ts'

const scopes: Scope<FakeConn>[] = []
function make() {
  const driver = new FakeDriver()
  const scope = createScope({ driver, default: false, leakDetectionMs: 0 })
  scopes.push(scope)
  return { driver, scope }
}
afterEach(async () => {
  await Promise.all(scopes.splice(0).map((s) => s.close({ timeoutMs: 100 })))
})

describe('open({ onSession })', () => {
  it('is not called for a scope that never makes a session', async () => {
    const { scope } = make()
    let calls = 0
    const open = scope.open({ name: 'GET /hello', kind: 'request', onSession: () => calls++ })
    await open.enter(async () => {
      expect(scope.hasSession()).toBe(true)
    })
    expect(open.endNow(true)).toBe(true)
    expect(calls).toBe(0)
  })

  it('is called once per session made, with the session in place, before getSession() returns', async () => {
    const { driver, scope } = make()
    const seen: (string | undefined)[] = []
    const open = scope.open({
      name: 'POST /x',
      kind: 'request',
      onSession: () => seen.push(open.existingSession?.id),
    })
    await open.enter(async () => {
      const first = scope.getSession()
      expect(seen).toEqual([first.id])
      expect(scope.getSession()).toBe(first)
      await first.use((c) => driver.query(c, 'A'))
      expect(seen).toHaveLength(1)
      await scope.remove()
      const second = scope.getSession()
      expect(second).not.toBe(first)
      expect(seen).toEqual([first.id, second.id])
    })
    await open.end({ commit: true })
    expect(seen).toHaveLength(2)
  })

  it('may abort the scope: the session it was called for is aborted before it is used', async () => {
    const { driver, scope } = make()
    const open = scope.open({
      name: 'GET /gone',
      kind: 'request',
      onSession: () => open.abort('client-abort'),
    })
    await open.enter(async () => {
      await expect(scope.getSession().use((c) => driver.query(c, 'A'))).rejects.toBeInstanceOf(
        ScopeAbortedError,
      )
    })
    expect(driver.checkedOut).toBe(0)
    await expect(open.end({ commit: true })).rejects.toBeInstanceOf(ScopeAbortedError)
  })

  it('is an open() option only, and must be a function', async () => {
    const { scope } = make()
    expect(() => scope.open({ onSession: 'yes' as never })).toThrow(
      /open\(fn, \{ onSession \}\): expected a function, got string/,
    )
    await expect(scope.run(async () => {}, { onSession: () => {} } as never)).rejects.toThrow(
      /run\(fn, \{ onSession \}\): only open\(\) takes it/,
    )
  })
})
