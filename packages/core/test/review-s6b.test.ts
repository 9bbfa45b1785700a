/**
 * Session 6 review, round b: probes of this session's core changes, with the
 * fake driver: the default scope stays the default while it closes (then the
 * top-level functions answer as the closed scope until another default is
 * made), and an unawaited remove() keeps its scope counted open until the
 * removed session released.
 */
import { afterEach, describe, expect, it } from 'vitest'
import {
  createScope,
  getDefaultScope,
  getSession,
  hasSession,
  NoActiveScopeError,
  runJob,
  type Scope,
  ScopeAbortedError,
  ScopeClosedError,
} from '../src/index.ts'
import { type FakeConn, FakeDriver } from './fake-driver.ts'

const scopes: Scope<FakeConn>[] = []
function make(driver = new FakeDriver(), opts: Record<string, unknown> = {}) {
  const scope = createScope({ driver, default: false, leakDetectionMs: 0, ...opts })
  scopes.push(scope)
  return { driver, scope }
}
afterEach(async () => {
  await Promise.all(scopes.splice(0).map((s) => s.close({ timeoutMs: 100 }).catch(() => {})))
})

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

class EndFails extends FakeDriver {
  override async end(): Promise<void> {
    throw new Error('pool end failed')
  }
}

describe('the default scope while and after it closes', () => {
  it('a default scope whose driver.end() rejects: close() rejects with it, and the default slot is released all the same', async () => {
    const first = createScope({ driver: new EndFails(), name: 'ends-badly', leakDetectionMs: 0 })
    await expect(first.close()).rejects.toThrow('pool end failed')
    expect(getDefaultScope()).toBeUndefined()
    expect(() => getSession()).toThrow(NoActiveScopeError)
    await expect(runJob(async () => {})).rejects.toBeInstanceOf(ScopeClosedError)
    const second = createScope({ driver: new FakeDriver(), name: 'next', leakDetectionMs: 0 })
    scopes.push(second)
    await expect(runJob(async () => getSession().name)).resolves.toBe('job:anonymous')
    await second.close()
  })

  it('createScope({ default }) while the default closes is refused, saying so; once it closed, one can be made', async () => {
    const driver = new FakeDriver()
    const first = createScope({ driver, name: 'closing-one', leakDetectionMs: 0 })
    let release!: () => void
    const job = runJob(async () => {
      await getSession().use((c) => driver.query(c as FakeConn, 'A'))
      await new Promise<void>((r) => {
        release = r
      })
    })
    await sleep(5)
    const closing = first.close({ timeoutMs: 2_000 })
    expect(getDefaultScope()).toBe(first)
    expect(() => createScope({ driver: new FakeDriver(), name: 'too-soon' })).toThrow(
      /'closing-one', and it is still closing/,
    )
    // A non-default scope can be made meanwhile; the top-level functions still use the first.
    const side = createScope({ driver: new FakeDriver(), default: false, leakDetectionMs: 0 })
    scopes.push(side)
    release()
    await job
    await closing
    const second = createScope({ driver: new FakeDriver(), name: 'after', leakDetectionMs: 0 })
    scopes.push(second)
    expect(getDefaultScope()).toBe(second)
    await second.close()
  })

  it('after close(): hasSession() is false, getSession() throws NoActiveScopeError naming the closed scope, runJob() rejects ScopeClosedError', async () => {
    const first = createScope({ driver: new FakeDriver(), name: 'gone', leakDetectionMs: 0 })
    await first.close()
    expect(hasSession()).toBe(false)
    const e = (() => {
      try {
        getSession()
      } catch (err) {
        return err
      }
    })()
    expect(e).toBeInstanceOf(NoActiveScopeError)
    expect((e as NoActiveScopeError).scopeName).toBe('gone')
    await expect(runJob(async () => {})).rejects.toBeInstanceOf(ScopeClosedError)
  })
})

describe('remove() not awaited', () => {
  it('with no new session after it, run() itself waits for the removed session (its end is that session’s close)', async () => {
    const { driver, scope } = make()
    let slow: Promise<unknown> | undefined
    await scope.run(async () => {
      slow = scope.getSession().use((c) => driver.query(c, 'SLOW', { ms: 60 }))
      await sleep(5)
      void scope.remove()
    })
    expect(driver.conns[0]!.busy).toBe(0)
    expect(scope.stats().open).toBe(0)
    await expect(slow).resolves.toBe('SLOW')
    expect(driver.releases.map((r) => r.busy)).toEqual([0])
  })

  it('called twice: the scope stays open until the removed session released; close() waits; one release, never under a statement', async () => {
    const { driver, scope } = make()
    let slow: Promise<unknown> | undefined
    await scope.run(async () => {
      const s = scope.getSession()
      slow = s.use((c) => driver.query(c, 'SLOW', { ms: 80 }))
      await sleep(5)
      void scope.remove()
      void scope.remove()
      await scope.getSession().use((c) => driver.query(c, 'NEW'))
    })
    // run() resolved with the new session; the removed one still waits for its statement.
    expect(scope.stats().open).toBe(1)
    await scope.close({ timeoutMs: 2_000 })
    await expect(slow).resolves.toBe('SLOW')
    expect(scope.stats().open).toBe(0)
    expect(driver.releases.map((r) => r.busy)).toEqual([0, 0])
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'SLOW', 'ROLLBACK'])
    expect(driver.conns[1]!.log).toEqual(['BEGIN', 'NEW', 'COMMIT'])
    expect(scope.stats().totals.forced).toBe(0)
  })

  it('remove(), getSession(), remove() again, both unawaited: both sessions release once, after their statements; close() waits for both', async () => {
    const { driver, scope } = make()
    const slow: Promise<unknown>[] = []
    await scope.run(async () => {
      slow.push(scope.getSession().use((c) => driver.query(c, 'SLOW-1', { ms: 60 })))
      await sleep(5)
      void scope.remove()
      slow.push(scope.getSession().use((c) => driver.query(c, 'SLOW-2', { ms: 90 })))
      await sleep(5)
      void scope.remove()
      await scope.getSession().use((c) => driver.query(c, 'NEW'))
    })
    expect(scope.stats().open).toBe(1)
    await scope.close({ timeoutMs: 2_000 })
    await expect(Promise.all(slow)).resolves.toEqual(['SLOW-1', 'SLOW-2'])
    expect(driver.releases.map((r) => r.busy)).toEqual([0, 0, 0])
    expect(scope.stats().totals.forced).toBe(0)
  })

  it('remove() in a job that then times out (timeoutMs): the job rejects as timed out; the scope ends once the removed session released', async () => {
    const { driver, scope } = make()
    let slow: Promise<unknown> | undefined
    const job = scope.runJob(
      async () => {
        slow = scope.getSession().use((c) => driver.query(c, 'SLOW', { ms: 80 }))
        slow.catch(() => {})
        await sleep(5)
        void scope.remove()
        await scope.getSession().use((c) => driver.query(c, 'NEW', { ms: 60 }))
      },
      { timeoutMs: 30 },
    )
    const err = await job.catch((e) => e)
    expect(err).toBeInstanceOf(ScopeAbortedError)
    expect((err as ScopeAbortedError).kind).toBe('timeout')
    await scope.close({ timeoutMs: 2_000 })
    expect(scope.stats().open).toBe(0)
    expect(driver.releases.map((r) => r.busy)).toEqual([0, 0])
    expect(scope.stats().totals.forced).toBe(0)
  })

  it('remove() from work left behind while the scope commits: the COMMIT stands, the scope ends once', async () => {
    const { driver, scope } = make()
    driver.delay('commit', 40)
    let late: Promise<unknown> | undefined
    await scope.run(async () => {
      await scope.getSession().use((c) => driver.query(c, 'A'))
      setTimeout(() => {
        late = scope.remove().then(
          () => 'resolved',
          (e: unknown) => (e as Error).name,
        )
      }, 10)
    })
    expect(late).toBeDefined()
    expect(await late).toBe('resolved')
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'A', 'COMMIT'])
    expect(scope.stats().open).toBe(0)
    expect(scope.stats().totals.committed).toBe(1)
  })

  it('the close() timeout still bounds a removed session that never finishes: forced, and close() resolves', async () => {
    const { driver, scope } = make(new FakeDriver(), { onError: () => {} })
    let slow: Promise<unknown> | undefined
    await scope.run(async () => {
      slow = scope.getSession().use((c) => driver.query(c, 'FOREVER', { ms: 3_000 }))
      slow.catch(() => {})
      await sleep(5)
      void scope.remove()
      await scope.getSession().use((c) => driver.query(c, 'NEW'))
    })
    await scope.close({ timeoutMs: 50 })
    expect(scope.stats().totals.forced).toBe(1)
  })
})
