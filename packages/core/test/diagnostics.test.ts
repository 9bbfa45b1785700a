/**
 * The `node:diagnostics_channel` events: each is published once, at its
 * moment, with its documented shape; and nothing is built or published when
 * nobody subscribes.
 */
import dc from 'node:diagnostics_channel'
import { afterEach, describe, expect, it, vi } from 'vitest'
import {
  type AcquireMessage,
  type CloseMessage,
  channels,
  createScope,
  type ErrorMessage,
  type LeakMessage,
  PoolTimeoutError,
  type ReleaseMessage,
  type RollbackMessage,
  type Scope,
  type TimeoutMessage,
} from '../src/index.ts'
import { type FakeConn, FakeDriver } from './fake-driver.ts'

const scopes: Scope<FakeConn>[] = []
function make(driver = new FakeDriver(), opts: Record<string, unknown> = {}) {
  const scope = createScope({ driver, default: false, leakDetectionMs: 0, name: 'diag', ...opts })
  scopes.push(scope)
  return { driver, scope }
}

type Name = keyof typeof channels
const names = Object.keys(channels) as Name[]
let events: { ch: Name; msg: any }[] = []
const unsubscribers: (() => void)[] = []

/** Record every event of every channel, in order. */
function listen(): { ch: Name; msg: any }[] {
  events = []
  for (const ch of names) {
    const fn = (msg: unknown) => {
      events.push({ ch, msg })
    }
    dc.subscribe(channels[ch].name, fn)
    unsubscribers.push(() => dc.unsubscribe(channels[ch].name, fn))
  }
  return events
}
const of = <T>(ch: Name): T[] => events.filter((e) => e.ch === ch).map((e) => e.msg as T)

afterEach(async () => {
  for (const u of unsubscribers.splice(0)) u()
  await Promise.all(scopes.splice(0).map((s) => s.close({ timeoutMs: 100 })))
  vi.restoreAllMocks()
})

const q = (
  scope: Scope<FakeConn>,
  driver: FakeDriver,
  sql: string,
  o?: { ms?: number; fail?: unknown },
) => scope.getSession().use((c) => driver.query(c, sql, o))
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

describe('one unit of work', () => {
  it('publishes acquire → commit → release → close, in that order, naming the session', async () => {
    const { driver, scope } = make()
    listen()
    await scope.run(async () => q(scope, driver, 'INSERT'), {
      name: 'POST /orders',
      requestId: 'r-1',
    })
    expect(events.map((e) => e.ch)).toEqual(['acquire', 'commit', 'release', 'close'])
    for (const { msg } of events) {
      expect(msg.scope).toBe('diag')
      expect(msg.session.name).toBe('POST /orders')
      expect(msg.session.requestId).toBe('r-1')
    }
    const [release] = of<ReleaseMessage>('release')
    expect(release).toMatchObject({ destroyed: false, outcome: 'committed' })
    expect(release!.heldMs).toBeGreaterThanOrEqual(0)
    expect('error' in release!).toBe(false)
    const [close] = of<CloseMessage>('close')
    expect(close).toMatchObject({ outcome: 'committed' })
    expect(close!.durationMs).toBeGreaterThanOrEqual(release!.heldMs)
    expect(close!.session.state).toBe('closed')
  })

  it('acquire.waitMs covers the time the driver took to hand out the connection', async () => {
    const { driver, scope } = make()
    driver.delay('acquire', 40)
    listen()
    await scope.run(async () => q(scope, driver, 'SELECT'))
    const [acquire] = of<AcquireMessage>('acquire')
    // setTimeout may fire up to a millisecond early; the wait is measured around it.
    expect(acquire!.waitMs).toBeGreaterThanOrEqual(35)
  })

  it('release.heldMs and close.durationMs cover the time the session held the connection', async () => {
    const { driver, scope } = make()
    listen()
    await scope.run(async () => {
      await q(scope, driver, 'SELECT')
      await sleep(40)
    })
    expect(of<ReleaseMessage>('release')[0]!.heldMs).toBeGreaterThanOrEqual(35)
    expect(of<CloseMessage>('close')[0]!.durationMs).toBeGreaterThanOrEqual(35)
  })

  it('a scope that throws publishes rollback (without error) and close with outcome rolled-back', async () => {
    const { driver, scope } = make()
    listen()
    await expect(
      scope.run(async () => {
        await q(scope, driver, 'INSERT')
        throw new Error('handler failed')
      }),
    ).rejects.toThrow('handler failed')
    expect(events.map((e) => e.ch)).toEqual(['acquire', 'rollback', 'release', 'close'])
    expect('error' in of<RollbackMessage>('rollback')[0]!).toBe(false)
    expect(of<ReleaseMessage>('release')[0]).toMatchObject({
      destroyed: false,
      outcome: 'rolled-back',
    })
    expect(of<CloseMessage>('close')[0]!.outcome).toBe('rolled-back')
  })

  it('a scope that never touches the database publishes only close, with outcome empty', async () => {
    const { scope } = make()
    listen()
    await scope.run(async () => {
      scope.getSession()
    })
    expect(events.map((e) => e.ch)).toEqual(['close'])
    expect(of<CloseMessage>('close')[0]!.outcome).toBe('empty')
  })

  it('a scope that never asks for a session publishes nothing', async () => {
    const { scope } = make()
    listen()
    await scope.run(async () => 1)
    expect(events).toEqual([])
  })
})

describe('commit and rollback', () => {
  it('commit is published once per transaction: an explicit commit() and the unit of work', async () => {
    const { driver, scope } = make()
    listen()
    await scope.run(async () => {
      await q(scope, driver, 'A')
      await scope.getSession().commit()
      await q(scope, driver, 'B')
    })
    expect(events.map((e) => e.ch)).toEqual(['acquire', 'commit', 'commit', 'release', 'close'])
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'A', 'COMMIT', 'BEGIN', 'B', 'COMMIT'])
  })

  it('rollback of transaction(fn) carries the error thrown inside it', async () => {
    const { driver, scope } = make(new FakeDriver(), { transaction: 'none' })
    listen()
    const boom = new Error('constraint violated')
    await scope.run(async () => {
      await scope
        .getSession()
        .transaction(async () => {
          await q(scope, driver, 'INSERT')
          throw boom
        })
        .catch(() => {})
    })
    const [rollback] = of<RollbackMessage>('rollback')
    expect(rollback!.error).toBe(boom)
    expect(of<CloseMessage>('close')[0]!.outcome).toBe('committed')
  })

  it('a failed COMMIT publishes rollback with the COMMIT error, and no commit', async () => {
    const { driver, scope } = make()
    const commitErr = new Error('could not serialize access')
    driver.failNext('commit', commitErr)
    listen()
    await expect(scope.run(async () => q(scope, driver, 'INSERT'))).rejects.toBe(commitErr)
    expect(of('commit')).toEqual([])
    expect(of<RollbackMessage>('rollback').map((m) => m.error)).toEqual([commitErr])
    expect(of<CloseMessage>('close')[0]!.outcome).toBe('rolled-back')
    expect(scope.stats().totals).toMatchObject({ committed: 0, rolledBack: 1 })
  })

  it('a connection that failed is destroyed: release says so, with the error, and close says destroyed', async () => {
    const { driver, scope } = make()
    const fatal = new Error('fatal: connection reset')
    listen()
    await expect(scope.run(async () => q(scope, driver, 'SELECT', { fail: fatal }))).rejects.toBe(
      fatal,
    )
    const [release] = of<ReleaseMessage>('release')
    expect(release).toMatchObject({ destroyed: true, outcome: 'destroyed', error: fatal })
    expect(of<CloseMessage>('close')[0]!.outcome).toBe('destroyed')
    expect(driver.releases[0]!.destroy).toBe(true)
  })
})

describe('pool trouble', () => {
  it('timeout names the waiting session and carries the PoolTimeoutError it throws', async () => {
    const { driver, scope } = make(new FakeDriver(1), { acquireTimeoutMs: 30 })
    listen()
    let release!: () => void
    const gate = new Promise<void>((r) => {
      release = r
    })
    const holder = scope.run(
      async () => {
        await q(scope, driver, 'SELECT')
        await gate
      },
      { name: 'GET /slow' },
    )
    await sleep(5)
    const err = await scope
      .run(async () => q(scope, driver, 'SELECT'), { name: 'GET /fast' })
      .catch((e) => e)
    release()
    await holder
    const timeouts = of<TimeoutMessage>('timeout')
    expect(timeouts).toHaveLength(1)
    expect(timeouts[0]!.session.name).toBe('GET /fast')
    expect(timeouts[0]!.error).toBe(err)
    expect(err).toBeInstanceOf(PoolTimeoutError)
    expect(timeouts[0]!.waitMs).toBeGreaterThanOrEqual(29)
    // The waiter never held a connection: its close says so.
    const fast = of<CloseMessage>('close').find((m) => m.session.name === 'GET /fast')
    expect(fast!.outcome).toBe('empty')
    expect(of<AcquireMessage>('acquire').map((m) => m.session.name)).toEqual(['GET /slow'])
  })

  it('leak carries the holder (name, requestId, state, site) once per checkout, after the warning', async () => {
    const warn = vi.fn()
    const { driver, scope } = make(new FakeDriver(), {
      leakDetectionMs: 20,
      captureStacks: true,
      logger: { warn, error: vi.fn() },
    })
    listen()
    await scope.run(
      async () => {
        await q(scope, driver, 'SELECT')
        await sleep(60)
      },
      { name: 'GET /orders/:id', requestId: 'req-42' },
    )
    const leaks = of<LeakMessage>('leak')
    expect(leaks).toHaveLength(1)
    expect(leaks[0]!.holder).toMatchObject({
      name: 'GET /orders/:id',
      requestId: 'req-42',
      state: 'in-transaction',
    })
    expect(leaks[0]!.holder.heldMs).toBeGreaterThanOrEqual(19)
    expect(leaks[0]!.holder.site).toContain('diagnostics.test.ts')
    expect(warn).toHaveBeenCalledTimes(1)
    expect(warn.mock.calls[0]![0]).toContain("session 'GET /orders/:id'")
    expect(warn.mock.calls[0]![0]).toContain('request req-42')
  })

  it('maxHoldMs: release (destroyed, with the reason) and close (destroyed) are published once', async () => {
    const { driver, scope } = make(new FakeDriver(), { maxHoldMs: 20 })
    listen()
    await scope
      .run(async () => {
        await q(scope, driver, 'SELECT')
        await sleep(50)
      })
      .catch(() => {})
    const releases = of<ReleaseMessage>('release')
    expect(releases).toHaveLength(1)
    expect(releases[0]).toMatchObject({ destroyed: true, outcome: 'destroyed' })
    expect(String(releases[0]!.error)).toContain('maxHoldMs')
    expect(of<CloseMessage>('close').map((m) => m.outcome)).toEqual(['destroyed'])
  })

  it('error carries what failed and during what (an afterCommit hook), and the commit stands', async () => {
    const onError = vi.fn()
    const { driver, scope } = make(new FakeDriver(), { onError })
    listen()
    const hookErr = new Error('mail server down')
    await scope.run(
      async () => {
        await q(scope, driver, 'INSERT')
        scope.getSession().afterCommit(() => {
          throw hookErr
        })
      },
      { name: 'POST /signup' },
    )
    const [error] = of<ErrorMessage>('error')
    expect(error).toMatchObject({ scope: 'diag', error: hookErr, during: 'afterCommit' })
    expect(error!.session!.name).toBe('POST /signup')
    expect(onError).toHaveBeenCalledWith(hookErr, {
      during: 'afterCommit',
      session: 'POST /signup',
    })
    expect(of<CloseMessage>('close')[0]!.outcome).toBe('committed')
  })
})

describe('cost when nobody listens', () => {
  /** Every kind of event happens: acquire, commit, rollback, release, close, leak, timeout, error. */
  async function everything() {
    const { driver, scope } = make(new FakeDriver(1), {
      acquireTimeoutMs: 20,
      leakDetectionMs: 10,
      logger: { warn: () => {}, error: () => {} },
      onError: () => {},
    })
    let release!: () => void
    const gate = new Promise<void>((r) => {
      release = r
    })
    const holder = scope.run(async () => {
      await q(scope, driver, 'A')
      scope.getSession().afterCommit(() => {
        throw new Error('hook')
      })
      await gate
    })
    await sleep(30) // leak fires
    await scope.run(async () => q(scope, driver, 'B')).catch(() => {}) // timeout
    release()
    await holder
    await scope
      .run(async () => {
        await q(scope, driver, 'C')
        throw new Error('rollback')
      })
      .catch(() => {})
    return scope
  }

  it('no channel is published to (and so no message is built) without a subscriber', async () => {
    for (const ch of names) expect(channels[ch].hasSubscribers).toBe(false)
    const spies = names.map((ch) => vi.spyOn(channels[ch], 'publish'))
    const scope = await everything()
    expect(scope.stats().totals).toMatchObject({
      leaks: 1,
      timeouts: 1,
      committed: 1,
      rolledBack: 1,
    })
    for (const spy of spies) expect(spy).not.toHaveBeenCalled()
  })

  it('with subscribers, the same run publishes every channel', async () => {
    listen()
    await everything()
    expect(new Set(events.map((e) => e.ch))).toEqual(new Set(names))
  })
})
