/**
 * A session method given something that is not a function fails at once,
 * naming the argument, and checks nothing out: a wrong argument must not cost
 * a connection (found by test/reliability/bad-input.test.ts).
 */
import { describe, expect, it } from 'vitest'
import { createScope } from '../src/index.ts'
import { FakeDriver } from './fake-driver.ts'

describe('session methods refuse a non-function before any checkout', () => {
  it.each([
    ['use', undefined, /use\(fn\): fn must be a function/],
    ['use', 'SELECT 1', /use\(fn\): fn must be a function/],
    ['transaction', undefined, /transaction\(fn\): fn must be a function/],
    ['transaction', { isolation: 'serializable' }, /transaction\(fn\): fn must be a function/],
  ] as const)('%s(%j)', async (method, arg, message) => {
    const driver = new FakeDriver()
    const scope = createScope({ driver, default: false, leakDetectionMs: 0 })
    try {
      const run = scope.run(() =>
        (scope.getSession()[method] as (a: unknown) => Promise<unknown>)(arg),
      )
      await expect(run).rejects.toThrow(TypeError)
      await expect(
        scope.run(() => (scope.getSession()[method] as (a: unknown) => Promise<unknown>)(arg)),
      ).rejects.toThrow(message)
      expect(driver.events).not.toContain('acquire')
      expect(scope.stats().totals.acquired).toBe(0)
    } finally {
      await scope.close()
    }
  })
})
