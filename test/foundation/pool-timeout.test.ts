/**
 * Acquisition never waits forever (problem 2 and 4 of the design): with the
 * pool exhausted by two holders, a third session gives up after
 * acquireTimeoutMs with a PoolTimeoutError that says who holds the
 * connections and where they took them.
 */
import { createScope, PoolTimeoutError } from '@scoped/core'
import { pgDriver } from '@scoped/pg'
import { beforeAll, describe, expect, it } from 'vitest'
import { testDatabase } from '../support/db.ts'
import {
  expectNoIdleInTransaction,
  expectPoolSettled,
  gate,
  type TestPool,
  testPool,
  waitFor,
} from './support.ts'

let url: string

beforeAll(async () => {
  url = await testDatabase('foundation_pool_timeout')
})

async function exhaust(captureStacks: boolean, t: TestPool) {
  const scope = createScope({
    driver: pgDriver(t.pool),
    default: false,
    name: 'timeout-pool',
    acquireTimeoutMs: 200,
    captureStacks,
  })
  const release = gate()
  const holding = ['GET /reports/slow', 'job:nightly-export'].map((name) =>
    scope.run(
      async () => {
        await scope.getSession().use((c) => c.query('SELECT 1'))
        await release.promise
      },
      { name },
    ),
  )
  await waitFor('both holders to hold', () => scope.stats().holding === 2)
  const third = scope.run(
    async () => {
      await scope.getSession().use((c) => c.query('SELECT 1'))
    },
    { name: 'GET /orders/:id' },
  )
  const err = await third.catch((e) => e)
  release.open()
  await Promise.all(holding)
  return { scope, err }
}

describe('PoolTimeoutError', () => {
  it('names both holders and their acquisition sites when captureStacks is on', async () => {
    const t = testPool(url, 'timeout_stacks', { max: 2 })
    const { scope, err } = await exhaust(true, t)
    try {
      expect(err).toBeInstanceOf(PoolTimeoutError)
      const e = err as PoolTimeoutError
      expect(e.code).toBe('POOL_TIMEOUT')
      expect(e.message).toContain("Session 'GET /orders/:id' waited 200 ms")
      expect(e.message).toContain("'GET /reports/slow'")
      expect(e.message).toContain("'job:nightly-export'")
      expect(e.message).toContain('2/2 in use')
      expect(e.holders.map((h) => h.name).sort()).toEqual([
        'GET /reports/slow',
        'job:nightly-export',
      ])
      // Both sit in their open unit of work (BEGIN sent, waiting on the gate): in-transaction.
      expect(e.holders.map((h) => h.state)).toEqual(['in-transaction', 'in-transaction'])
      expect(e.message).toMatch(/held \d+ ms, in-transaction/)
      // The acquisition site is this test file, not the library's internals.
      for (const h of e.holders) {
        expect(h.site).toContain('pool-timeout.test.ts')
        expect(e.message).toContain(`acquired at ${h.site}`)
      }
      expect(scope.stats().totals.timeouts).toBe(1)
      // The waiter gave up cleanly: nothing extra was opened and all went back.
      expect(t.connects()).toBe(2)
      expectPoolSettled(t.pool)
      await expectNoIdleInTransaction(url, t.app)
    } finally {
      await scope.close()
    }
  })

  it('still names the holders without stacks', async () => {
    const t = testPool(url, 'timeout_nostacks', { max: 2 })
    const { scope, err } = await exhaust(false, t)
    try {
      expect(err).toBeInstanceOf(PoolTimeoutError)
      const e = err as PoolTimeoutError
      expect(e.holders.map((h) => h.name).sort()).toEqual([
        'GET /reports/slow',
        'job:nightly-export',
      ])
      expect(e.holders.every((h) => h.site === undefined)).toBe(true)
      expect(e.message).not.toContain('acquired at')
      expectPoolSettled(t.pool)
    } finally {
      await scope.close()
    }
  })

  it('the next scope works once the holders are gone', async () => {
    const t = testPool(url, 'timeout_after', { max: 2 })
    const { scope } = await exhaust(true, t)
    try {
      const n = await scope.run(async () =>
        scope.getSession().use(async (c) => (await c.query('SELECT 41 + 1 AS n')).rows[0].n),
      )
      expect(n).toBe(42)
      expectPoolSettled(t.pool)
    } finally {
      await scope.close()
    }
  })
})
