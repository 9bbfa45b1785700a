/**
 * `instrumentScope`: the OpenTelemetry instruments carry the values of what
 * happened, read back through a real SDK MeterProvider.
 */
import { metrics } from '@opentelemetry/api'
import { afterEach, describe, expect, it } from 'vitest'
import { createScope, type Driver, type Scope } from '../src/index.ts'
import { instrumentScope } from '../src/otel/index.ts'
import { type FakeConn, FakeDriver } from './fake-driver.ts'
import { testMeterProvider } from './otel-support.ts'

const cleanups: (() => unknown)[] = []
afterEach(async () => {
  for (const fn of cleanups.splice(0).reverse()) await fn()
})

function make(
  name: string,
  driver: Driver<FakeConn> = new FakeDriver(),
  opts: Record<string, unknown> = {},
) {
  const scope = createScope({ driver, default: false, leakDetectionMs: 0, name, ...opts })
  cleanups.push(() => scope.close({ timeoutMs: 100 }))
  return scope
}

function instrument(scope: Scope<FakeConn>) {
  const otel = testMeterProvider()
  const stop = instrumentScope(scope, { meterProvider: otel.provider })
  cleanups.push(stop, () => otel.provider.shutdown())
  return { ...otel, stop }
}

const pool = (name: string) => ({ 'db.client.connection.pool.name': name })
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
const gate = () => {
  let open!: () => void
  const promise = new Promise<void>((r) => {
    open = r
  })
  return { promise, open }
}

describe('instrumentScope', () => {
  it('after 100 scopes of which 10 threw: 90 committed and 10 rolled-back session durations, 100 waits and uses', async () => {
    const driver = new FakeDriver(3)
    const scope = make('orders', driver)
    const { collect } = instrument(scope)
    const work = Array.from({ length: 100 }, (_, i) =>
      scope
        .run(
          async () => {
            await scope.getSession().use((c) => driver.query(c, `INSERT ${i}`, { ms: 1 }))
            if (i % 10 === 0) throw new Error(`request ${i} failed`)
          },
          { name: 'POST /orders' },
        )
        .catch(() => 'failed'),
    )
    const results = await Promise.all(work)
    expect(results.filter((r) => r === 'failed')).toHaveLength(10)

    const m = await collect()
    const committed = m.histogram('scoped.session.duration', {
      ...pool('orders'),
      'scoped.session.outcome': 'committed',
    })
    const rolledBack = m.histogram('scoped.session.duration', {
      ...pool('orders'),
      'scoped.session.outcome': 'rolled_back',
    })
    expect(committed?.count).toBe(90)
    expect(rolledBack?.count).toBe(10)
    expect(
      m.point('scoped.session.duration', { 'scoped.session.outcome': 'destroyed' }),
    ).toBeUndefined()
    // 100 checkouts, with 3 connections for 100 sessions: most waited.
    expect(m.histogram('db.client.connection.wait_time', pool('orders'))?.count).toBe(100)
    const use = m.histogram('db.client.connection.use_time', pool('orders'))
    expect(use?.count).toBe(100)
    expect(use!.sum).toBeGreaterThan(0)
    expect(m.metric('db.client.connection.use_time')?.descriptor.unit).toBe('s')
    // Seconds, not milliseconds: each use slept ~1 ms, none held a connection for a second.
    expect(use!.max!).toBeLessThan(1)
    expect(scope.stats().totals).toMatchObject({ acquired: 100, committed: 90, rolledBack: 10 })
    // Everything went back: the pool gauge says so.
    expect(
      m.value('db.client.connection.count', {
        ...pool('orders'),
        'db.client.connection.state': 'used',
      }),
    ).toBe(0)
    expect(
      m.value('db.client.connection.count', {
        ...pool('orders'),
        'db.client.connection.state': 'idle',
      }),
    ).toBe(3)
    expect(m.value('db.client.connection.max', pool('orders'))).toBe(3)
    expect(m.value('db.client.connection.pending_requests', pool('orders'))).toBe(0)
  })

  it('gauges show a busy pool as it is: used, idle, max and pending requests', async () => {
    const driver = new FakeDriver(2)
    const scope = make('busy', driver, { acquireTimeoutMs: 5_000 })
    const { collect } = instrument(scope)
    const hold = gate()
    const running = Array.from({ length: 5 }, (_, i) =>
      scope.run(
        async () => {
          await scope.getSession().use((c) => driver.query(c, `q${i}`))
          await hold.promise
        },
        { name: `job:${i}` },
      ),
    )
    // Sessions count as waiting from the moment they ask; the pool's own queue is what we want.
    while (scope.stats().holding < 2 || driver.poolStats().waiting < 3) await sleep(2)
    const m = await collect()
    expect(m.value('db.client.connection.count', { 'db.client.connection.state': 'used' })).toBe(2)
    expect(m.value('db.client.connection.count', { 'db.client.connection.state': 'idle' })).toBe(0)
    expect(m.value('db.client.connection.max')).toBe(2)
    expect(m.value('db.client.connection.pending_requests')).toBe(3)
    expect(m.histogram('db.client.connection.wait_time')?.count).toBe(2)
    hold.open()
    await Promise.all(running)
    const after = await collect()
    expect(after.value('db.client.connection.pending_requests')).toBe(0)
    expect(after.histogram('db.client.connection.wait_time')?.count).toBe(5)
  })

  it('timeouts counts real pool timeouts; a timed-out wait is not a wait_time observation', async () => {
    const driver = new FakeDriver(1)
    const scope = make('tight', driver, { acquireTimeoutMs: 20 })
    const { collect } = instrument(scope)
    const hold = gate()
    const holder = scope.run(async () => {
      await scope.getSession().use((c) => driver.query(c, 'SELECT'))
      await hold.promise
    })
    await sleep(5)
    const waiters = await Promise.all(
      Array.from({ length: 3 }, () =>
        scope
          .run(async () => scope.getSession().use((c) => driver.query(c, 'SELECT')))
          .catch((e) => e),
      ),
    )
    hold.open()
    await holder
    expect(waiters.map((e) => e.code)).toEqual(['POOL_TIMEOUT', 'POOL_TIMEOUT', 'POOL_TIMEOUT'])
    const m = await collect()
    expect(m.value('db.client.connection.timeouts', pool('tight'))).toBe(3)
    expect(scope.stats().totals.timeouts).toBe(3)
    expect(m.histogram('db.client.connection.wait_time')?.count).toBe(1)
    // Sessions that never got a connection are not session durations.
    expect(
      m.histogram('scoped.session.duration', { 'scoped.session.outcome': 'committed' })?.count,
    ).toBe(1)
    expect(m.metric('scoped.session.duration')?.dataPoints).toHaveLength(1)
  })

  it('a session whose connection failed is a destroyed session duration', async () => {
    const driver = new FakeDriver()
    const scope = make('broken', driver)
    const { collect } = instrument(scope)
    await scope
      .run(async () =>
        scope
          .getSession()
          .use((c) => driver.query(c, 'SELECT', { fail: new Error('fatal: reset') })),
      )
      .catch(() => {})
    const m = await collect()
    expect(
      m.histogram('scoped.session.duration', { 'scoped.session.outcome': 'destroyed' })?.count,
    ).toBe(1)
    expect(scope.stats().totals.destroyed).toBe(1)
  })

  it('counts only its own scope, though the channels are process-wide', async () => {
    const a = make('a')
    const b = make('b')
    const { collect } = instrument(a)
    await a.run(async () => a.getSession().connection())
    await b.run(async () => b.getSession().connection())
    await b.run(async () => b.getSession().connection())
    const m = await collect()
    expect(m.histogram('db.client.connection.wait_time', pool('a'))?.count).toBe(1)
    expect(m.point('db.client.connection.wait_time', pool('b'))).toBeUndefined()
  })

  it('the disposer stops recording: later sessions are not counted', async () => {
    const driver = new FakeDriver()
    const scope = make('stop', driver)
    const { collect, stop } = instrument(scope)
    await scope.run(async () => scope.getSession().connection())
    stop()
    stop() // idempotent
    await scope.run(async () => scope.getSession().connection())
    const m = await collect()
    expect(m.histogram('db.client.connection.wait_time')?.count).toBe(1)
    expect(m.histogram('scoped.session.duration')?.count).toBe(1)
  })

  it('a driver without poolStats(): used connections and pending requests come from the scope', async () => {
    const fake = new FakeDriver(1)
    const driver: Driver<FakeConn> = {
      name: 'bare',
      acquire: (s) => fake.acquire(s),
      release: (c, o) => fake.release(c, o),
      begin: (c, o) => fake.begin(c, o),
      commit: (c) => fake.commit(c),
      rollback: (c) => fake.rollback(c),
    }
    const scope = make('bare', driver)
    const { collect } = instrument(scope)
    const hold = gate()
    const running = [1, 2].map(() =>
      scope.run(async () => {
        await scope.getSession().connection()
        await hold.promise
      }),
    )
    while (scope.stats().holding < 1 || fake.poolStats().waiting < 1) await sleep(2)
    const m = await collect()
    expect(m.value('db.client.connection.count', { 'db.client.connection.state': 'used' })).toBe(1)
    expect(
      m.point('db.client.connection.count', { 'db.client.connection.state': 'idle' }),
    ).toBeUndefined()
    expect(m.point('db.client.connection.max')).toBeUndefined()
    expect(m.value('db.client.connection.pending_requests')).toBe(1)
    hold.open()
    await Promise.all(running)
  })

  it('refuses a second scope of the same name until the first is disposed', async () => {
    const first = make('main')
    const second = make('main')
    const { stop } = instrument(first)
    expect(() => instrumentScope(second, { meterProvider: testMeterProvider().provider })).toThrow(
      /another scope named 'main' is already instrumented.*give each scope its own name/s,
    )
    stop()
    expect(() => instrument(second)).not.toThrow()
  })

  it('uses the global MeterProvider by default, and a given meter when asked', async () => {
    const global = testMeterProvider()
    metrics.setGlobalMeterProvider(global.provider)
    cleanups.push(() => metrics.disable())
    const scope = make('global')
    cleanups.push(instrumentScope(scope))
    await scope.run(async () => scope.getSession().connection())
    expect((await global.collect()).histogram('db.client.connection.wait_time')?.count).toBe(1)

    const own = testMeterProvider()
    const other = make('own-meter')
    cleanups.push(instrumentScope(other, { meter: own.provider.getMeter('my-app') }))
    await other.run(async () => other.getSession().connection())
    const m = await own.collect()
    expect(m.histogram('db.client.connection.wait_time', pool('own-meter'))?.count).toBe(1)
  })

  it('rejects wrong arguments with the call in the message', () => {
    const scope = make('args')
    expect(() => instrumentScope({} as never)).toThrow(/instrumentScope\(scope\): expected a Scope/)
    const p = testMeterProvider().provider
    expect(() => instrumentScope(scope, { meter: p.getMeter('x'), meterProvider: p })).toThrow(
      /pass one of them, not both/,
    )
  })
})
