/**
 * A wrong option is a TypeError that names it, thrown before anything starts:
 * no connection is checked out, no backend appears in pg_stat_activity.
 */
import { createScope, type ScopeOptions } from '@scoped/core'
import { pgDriver } from '@scoped/pg'
import type pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { backends, testDatabase } from '../support/db.ts'
import { type TestPool, testPool } from './support.ts'

let url: string
let t: TestPool

beforeAll(async () => {
  url = await testDatabase('foundation_bad_options')
  t = testPool(url, 'bad_options', { max: 2 })
})

afterAll(async () => {
  if (!t.pool.ended) await t.pool.end()
  // Nothing above ever opened a connection.
  expect(t.connects()).toBe(0)
  expect(await backends(url, t.app)).toEqual([])
})

const make = (extra: Record<string, unknown>) => () =>
  createScope({
    driver: pgDriver(t.pool),
    default: false,
    ...extra,
  } as ScopeOptions<pg.PoolClient>)

describe('createScope() rejects bad options with a TypeError naming the option', () => {
  it.each([
    ['acquireTimeoutMs', -1],
    ['acquireTimeoutMs', 0],
    ['acquireTimeoutMs', Number.NaN],
    ['acquireTimeoutMs', Number.POSITIVE_INFINITY],
    ['acquireTimeoutMs', '1000'],
    ['leakDetectionMs', -5],
    ['maxHoldMs', Number.NaN],
    ['captureStacks', 'yes'],
    ['default', 1],
    ['transaction', 'sometimes'],
    ['transaction', 'AUTO'],
    ['name', ''],
    ['onError', 'console'],
  ])('%s: %s', (key, value) => {
    expect(make({ [key]: value })).toThrow(TypeError)
    expect(make({ [key]: value })).toThrow(key)
    expect(t.pool.totalCount).toBe(0)
  })

  it('an unknown option key (a typo) is named, with the known ones', () => {
    const err = (() => {
      try {
        make({ acquireTimeout: 5_000 })()
      } catch (e) {
        return e as Error
      }
    })()
    expect(err).toBeInstanceOf(TypeError)
    expect(err!.message).toContain('acquireTimeout')
    expect(err!.message).toContain('unknown option')
    expect(err!.message).toContain('acquireTimeoutMs')
  })

  it('a logger without warn/error', () => {
    expect(make({ logger: {} })).toThrow(/logger/)
  })

  it('a driver that is missing acquire, release or name', () => {
    const real = pgDriver(t.pool)
    const { acquire: _a, ...noAcquire } = real
    expect(() => createScope({ driver: noAcquire as never, default: false })).toThrow(TypeError)
    expect(() => createScope({ driver: noAcquire as never, default: false })).toThrow(
      'driver.acquire',
    )
    const { release: _r, ...noRelease } = real
    expect(() => createScope({ driver: noRelease as never, default: false })).toThrow(
      'driver.release',
    )
    expect(() => createScope({ driver: { ...real, name: '' }, default: false })).toThrow(
      'driver.name',
    )
    expect(() => createScope({ driver: undefined as never, default: false })).toThrow('driver')
  })

  it("a driver without transactions is refused in 'auto' mode, accepted with transaction: 'none'", () => {
    const { begin: _b, ...noBegin } = pgDriver(t.pool)
    expect(() => createScope({ driver: noBegin, default: false })).toThrow(
      /begin\(\).*transaction: 'none'/,
    )
    const scope = createScope({ driver: noBegin, default: false, transaction: 'none' })
    expect(scope.options.transaction).toBe('none')
  })

  it('a bad option does not take the default-scope slot', async () => {
    expect(() =>
      createScope({
        driver: pgDriver(t.pool),
        acquireTimeoutMs: -1,
      } as ScopeOptions<pg.PoolClient>),
    ).toThrow(TypeError)
    // The failed call registered nothing: a default scope can still be created (and closed).
    // Its own pool: close() ends the scope's pool.
    const own = testPool(url, 'bad_options_default', { max: 1 })
    const scope = createScope({ driver: pgDriver(own.pool) })
    expect(scope.options.default).toBe(true)
    await scope.close()
  })
})

describe('per-call options', () => {
  it('run / runJob / transaction reject bad options before checking out anything', async () => {
    const pool = testPool(url, 'bad_call_options', { max: 2 })
    const scope = createScope({ driver: pgDriver(pool.pool), default: false })
    try {
      const calls: [string, () => Promise<unknown>][] = [
        ['transaction', () => scope.run(async () => {}, { transaction: 'never' as 'none' })],
        ['name', () => scope.run(async () => {}, { name: '' })],
        ['signal', () => scope.run(async () => {}, { signal: 'stop' as never })],
        ['timeoutMs', () => scope.runJob(async () => {}, { timeoutMs: -1 })],
        ['timeoutMs', () => scope.runJob(async () => {}, { timeoutMs: Number.POSITIVE_INFINITY })],
        ['fn', () => scope.run('not a function' as never)],
        [
          'isolation',
          () =>
            scope.run(() =>
              scope.getSession().transaction(async () => {}, { isolation: 'snapshot' as never }),
            ),
        ],
        [
          'attempts',
          () =>
            scope.run(() =>
              scope.getSession().transaction(async () => {}, { retry: { attempts: 0 } }),
            ),
        ],
        [
          'backoffMs',
          () =>
            scope.run(() =>
              scope.getSession().transaction(async () => {}, {
                retry: { attempts: 2, backoffMs: Number.NaN },
              }),
            ),
        ],
      ]
      for (const [option, call] of calls) {
        const err = (await call().catch((e: unknown) => e)) as Error
        expect(err, option).toBeInstanceOf(TypeError)
        expect(err.message, option).toContain(option)
      }
      expect(() => scope.close({ timeoutMs: -1 })).toThrow('timeoutMs')
      expect(scope.stats().totals.acquired).toBe(0)
      expect(pool.connects()).toBe(0)
    } finally {
      await scope.close()
    }
  })

  it('loop() needs a signal and sane timings', async () => {
    const scope = createScope({ driver: pgDriver(t.pool), default: false })
    try {
      const signal = new AbortController().signal
      await expect(scope.loop(async () => {}, {} as never)).rejects.toThrow(/signal/)
      await expect(scope.loop(async () => {}, { signal, intervalMs: -1 })).rejects.toThrow(
        'intervalMs',
      )
      await expect(
        scope.loop(async () => {}, { signal, backoff: { initialMs: 100, maxMs: 10 } }),
      ).rejects.toThrow('maxMs')
      expect(scope.stats().totals.acquired).toBe(0)
    } finally {
      await scope.close()
    }
  })
})
