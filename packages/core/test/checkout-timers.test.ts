/**
 * The checkout's signal and deadlines, which the core shares between sessions
 * for speed (a free list of AbortControllers, one timer per kind of deadline):
 * sharing must never let one session's timeout or abort reach another's.
 */
import { afterEach, describe, expect, it } from 'vitest'
import { createScope, type Driver, PoolTimeoutError, type Scope } from '../src/index.ts'

interface Conn {
  id: number
}

/** A driver that hands out connections on demand and records the signal of every acquire. */
class SignalDriver implements Driver<Conn> {
  readonly name = 'signals'
  readonly signals: AbortSignal[] = []
  /** Whether each signal was already aborted when acquire() got it. */
  readonly abortedOnArrival: boolean[] = []
  readonly released: number[] = []
  #next = 0
  /** Pending acquires, resolved by `deliver()`. */
  #waiting: (() => void)[] = []
  /** When true, acquire waits for deliver(); otherwise it resolves at once. */
  hold = false
  /** When true, acquire leaves an 'abort' listener on its signal for good. */
  listen = false

  acquire(signal: AbortSignal): Promise<Conn> {
    this.signals.push(signal)
    this.abortedOnArrival.push(signal.aborted)
    if (this.listen) signal.addEventListener('abort', () => {})
    const conn = { id: ++this.#next }
    if (!this.hold) return Promise.resolve(conn)
    return new Promise((resolve) => this.#waiting.push(() => resolve(conn)))
  }

  deliver(): void {
    for (const w of this.#waiting.splice(0)) w()
  }

  release(conn: Conn): void {
    this.released.push(conn.id)
  }
}

const scopes: Scope<Conn>[] = []
function make(driver: SignalDriver, opts: Record<string, unknown> = {}) {
  const scope = createScope({
    driver,
    default: false,
    transaction: 'none',
    leakDetectionMs: 0,
    ...opts,
  })
  scopes.push(scope)
  return scope
}
afterEach(async () => {
  await Promise.all(scopes.splice(0).map((s) => s.close({ timeoutMs: 100 })))
})

const useOnce = (scope: Scope<Conn>) => scope.run(() => scope.getSession().use(async (c) => c.id))

describe('the signal handed to driver.acquire()', () => {
  it('is unaborted for every checkout, including after another one timed out', async () => {
    const driver = new SignalDriver()
    const scope = make(driver, { acquireTimeoutMs: 20 })
    await useOnce(scope)
    driver.hold = true
    await expect(useOnce(scope)).rejects.toBeInstanceOf(PoolTimeoutError)
    driver.hold = false
    await useOnce(scope)
    await useOnce(scope)
    const timedOut = driver.signals[1]!
    expect(timedOut.aborted).toBe(true)
    expect(timedOut.reason).toBeInstanceOf(PoolTimeoutError)
    // Every checkout got an unaborted signal; the aborted one is never handed out again.
    expect(driver.abortedOnArrival).toEqual([false, false, false, false])
    expect(driver.signals.slice(2)).not.toContain(timedOut)
    for (const s of driver.signals.slice(2)) expect(s.aborted).toBe(false)
    driver.deliver()
  })

  it('is never reused while the driver still listens to it', async () => {
    const driver = new SignalDriver()
    driver.listen = true
    const scope = make(driver)
    for (let i = 0; i < 5; i++) await useOnce(scope)
    expect(new Set(driver.signals).size).toBe(5)
  })

  it('a late connection after a timeout goes back to the driver, and the next session gets its own', async () => {
    const driver = new SignalDriver()
    const scope = make(driver, { acquireTimeoutMs: 20 })
    driver.hold = true
    await expect(useOnce(scope)).rejects.toBeInstanceOf(PoolTimeoutError)
    driver.deliver()
    await new Promise((r) => setImmediate(r))
    expect(driver.released).toEqual([1])
    driver.hold = false
    expect(await useOnce(scope)).toBe(2)
    expect(driver.released).toEqual([1, 2])
  })
})

describe('deadlines (one timer per kind, shared by the sessions of a scope)', () => {
  it('each waiting checkout times out on its own deadline, never before it', async () => {
    const driver = new SignalDriver()
    driver.hold = true
    const scope = make(driver, { acquireTimeoutMs: 40 })
    const waits = [0, 15, 30].map(async (delay) => {
      await new Promise((r) => setTimeout(r, delay))
      const started = performance.now()
      const error = await useOnce(scope).catch((e: unknown) => e)
      return { error, waited: performance.now() - started }
    })
    const results = await Promise.all(waits)
    for (const { error, waited } of results) {
      expect(error).toBeInstanceOf(PoolTimeoutError)
      expect(waited).toBeGreaterThanOrEqual(39)
    }
    expect(scope.stats()).toMatchObject({ waiting: 0, totals: { timeouts: 3 } })
    driver.deliver()
  })

  it('a checkout that got its connection is not timed out later', async () => {
    const driver = new SignalDriver()
    const scope = make(driver, { acquireTimeoutMs: 20 })
    await scope.run(async () => {
      await scope.getSession().use(async () => {
        await new Promise((r) => setTimeout(r, 60))
      })
    })
    expect(scope.stats().totals).toMatchObject({ timeouts: 0, acquired: 1 })
  })

  it('warns of a leak once, for the session that still holds, not for those that released', async () => {
    const warnings: string[] = []
    const logger = { warn: (m: string) => warnings.push(m), error: () => {} }
    const driver = new SignalDriver()
    const scope = make(driver, { leakDetectionMs: 30, logger })
    await scope.run(() => scope.getSession().use(async () => 1), { name: 'quick' })
    await scope.run(() => scope.getSession().use(() => new Promise((r) => setTimeout(r, 90))), {
      name: 'slow',
    })
    await scope.run(() => scope.getSession().use(async () => 1), { name: 'quick-again' })
    await new Promise((r) => setTimeout(r, 50))
    expect(warnings).toHaveLength(1)
    expect(warnings[0]).toMatch(/session 'slow'/)
    expect(scope.stats().totals.leaks).toBe(1)
  })

  it('a process whose scopes are done exits at once, though the deadlines are long', async () => {
    const { spawnSync } = await import('node:child_process')
    const fixture = new URL('./fixtures/exits-when-done.ts', import.meta.url).pathname
    const started = performance.now()
    const child = spawnSync(process.execPath, ['--import', 'tsx', fixture], {
      encoding: 'utf8',
      timeout: 20_000,
    })
    expect(child.stderr).toBe('')
    expect(child.stdout.trim()).toBe('done')
    expect(child.status).toBe(0)
    // acquireTimeoutMs and leakDetectionMs are 60 s there: a timer kept alive would hold it that long.
    expect(performance.now() - started).toBeLessThan(20_000)
  })
})
