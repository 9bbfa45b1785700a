import { afterEach, describe, expect, it } from 'vitest'
import { createScope, type Scope, TransactionStateError } from '../src/index.ts'
import { expectNoLeaks, withRollback } from '../src/testing/index.ts'
import { type FakeConn, FakeDriver } from './fake-driver.ts'

const scopes: Scope<FakeConn>[] = []
function make(opts: Record<string, unknown> = {}) {
  const driver = new FakeDriver()
  const scope = createScope({
    driver,
    default: false,
    leakDetectionMs: 0,
    captureStacks: true,
    ...opts,
  })
  scopes.push(scope)
  return { driver, scope }
}
afterEach(async () => {
  await Promise.all(scopes.splice(0).map((s) => s.close({ timeoutMs: 50 })))
})

describe('withRollback', () => {
  it('returns fn’s result and always rolls the unit of work back; inner transactions are savepoints', async () => {
    const { driver, scope } = make()
    const r = await withRollback(scope, async () => {
      const s = scope.getSession()
      await s.use((c) => driver.query(c, 'INSERT a'))
      await s.transaction(async () => {
        await s.use((c) => driver.query(c, 'INSERT b'))
      })
      return 42
    })
    expect(r).toBe(42)
    expect(driver.conns[0]!.log).toEqual([
      'BEGIN',
      'INSERT a',
      'SAVEPOINT scoped_sp_1',
      'INSERT b',
      'RELEASE scoped_sp_1',
      'ROLLBACK',
    ])
    expect(scope.stats().totals).toMatchObject({ committed: 0, rolledBack: 1 })
  })

  it('an explicit commit() in the code under test throws instead of committing', async () => {
    const { driver, scope } = make()
    await expect(
      withRollback(scope, async () => {
        await scope.getSession().use((c) => driver.query(c, 'INSERT'))
        await scope.getSession().commit()
      }),
    ).rejects.toBeInstanceOf(TransactionStateError)
    expect(driver.conns[0]!.log).not.toContain('COMMIT')
  })

  it('rethrows the test’s own error', async () => {
    const { scope } = make()
    await expect(
      withRollback(scope, async () => {
        throw new Error('assertion failed')
      }),
    ).rejects.toThrow('assertion failed')
  })
})

describe('expectNoLeaks', () => {
  it('resolves when nothing is held', async () => {
    const { driver, scope } = make()
    await scope.run(async () => scope.getSession().use((c) => driver.query(c, 'q')))
    await expect(expectNoLeaks(scope)).resolves.toBeUndefined()
  })

  it('waits for a late release, then fails listing the holders with their acquisition site', async () => {
    const { driver, scope } = make()
    const open = scope.open({ name: 'GET /leaky' })
    await open.enter(() => scope.getSession().use((c) => driver.query(c, 'q')))
    const err = await expectNoLeaks(scope, { timeoutMs: 30 }).catch((e: Error) => e)
    expect(err).toBeInstanceOf(Error)
    expect((err as Error).message).toMatch(
      /still holds connections.*\n.*'GET \/leaky'.*in-transaction, acquired at .*testing\.test\.ts/,
    )
    setTimeout(() => void open.end({ commit: true }), 20)
    await expect(expectNoLeaks(scope, { timeoutMs: 1000 })).resolves.toBeUndefined()
  })
})
