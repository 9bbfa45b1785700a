/**
 * The worker-loop leak (problem 1 and 2 of the design): 5,000 runJob
 * iterations on a pool of 5, ten at a time, where a third throw (a JS error
 * after a write, an SQL error, a throw before any statement) and some return
 * early. Afterwards every client is back in the pool, no backend is left idle
 * in transaction, and exactly the successful iterations' rows are committed.
 */
import { createScope } from '@scoped/core'
import { pgDriver, serial } from '@scoped/pg'
import type pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { testDatabase } from '../support/db.ts'
import {
  committedRows,
  createTable,
  expectNoIdleInTransaction,
  expectPoolSettled,
  type TestPool,
  testPool,
} from './support.ts'

const ITERATIONS = 5_000
const CONCURRENCY = 10

let url: string
let t: TestPool

beforeAll(async () => {
  url = await testDatabase('foundation_job_soak')
  await createTable(url, 'work', 'n int NOT NULL UNIQUE, touched boolean NOT NULL DEFAULT false')
  t = testPool(url, 'soak', { max: 5 })
})

afterAll(async () => {
  if (!t.pool.ended) await t.pool.end()
})

class IterationError extends Error {}

describe('runJob in a loop', () => {
  it(`${ITERATIONS} iterations, a third failing, leave no connection behind`, async () => {
    const errors: unknown[] = []
    const scope = createScope({
      driver: pgDriver(t.pool),
      default: false,
      name: 'soak',
      onError: (e) => errors.push(e),
    })
    const q = (c: pg.PoolClient, sql: string, values?: unknown[]) =>
      serial(c, () => c.query(sql, values))

    const succeeded: number[] = []
    let failed = 0
    let earlyReturns = 0
    const iteration = async (n: number): Promise<void> => {
      const session = scope.getSession()
      if (n % 9 === 6) throw new IterationError(`no statement ran in ${n}`)
      await session.use((c) => q(c, 'INSERT INTO work (n) VALUES ($1)', [n]))
      if (n % 9 === 0) throw new IterationError(`after the write in ${n}`)
      if (n % 9 === 3) await session.use((c) => q(c, 'SELECT 1 / 0'))
      if (n % 5 === 1) {
        earlyReturns++
        return
      }
      await session.use((c) => q(c, 'UPDATE work SET touched = true WHERE n = $1', [n]))
    }

    let next = 0
    const worker = async () => {
      while (next < ITERATIONS) {
        const n = next++
        try {
          await scope.runJob(() => iteration(n), { name: 'soak' })
          succeeded.push(n)
        } catch (e) {
          if (!(e instanceof IterationError) && (e as { code?: string }).code !== '22012') throw e
          failed++
        }
      }
    }
    await Promise.all(Array.from({ length: CONCURRENCY }, worker))

    expect(failed).toBe(Math.ceil(ITERATIONS / 3))
    expect(succeeded.length + failed).toBe(ITERATIONS)
    expect(earlyReturns).toBeGreaterThan(0)
    expect(errors).toEqual([])

    expectPoolSettled(t.pool)
    expect(t.pool.totalCount).toBeLessThanOrEqual(5)
    await expectNoIdleInTransaction(url, t.app)

    const rows = await committedRows<{ n: number; touched: boolean }>(
      url,
      'SELECT n, touched FROM work ORDER BY n',
    )
    expect(rows.map((r) => r.n)).toEqual([...succeeded].sort((a, b) => a - b))
    // An early return still commits what was written before it; the others ran to the end.
    expect(rows.filter((r) => !r.touched).every((r) => r.n % 5 === 1)).toBe(true)
    expect(rows.filter((r) => r.touched).length).toBe(succeeded.length - earlyReturns)

    const stats = scope.stats()
    expect(stats.holding).toBe(0)
    expect(stats.open).toBe(0)
    expect(stats.totals.destroyed).toBe(0)
    expect(stats.totals.committed).toBe(succeeded.length)
    // Failures before any statement checked nothing out, so there was nothing to roll back.
    const withoutStatement = Array.from({ length: ITERATIONS }, (_, n) => n).filter(
      (n) => n % 9 === 6,
    )
    expect(stats.totals.rolledBack).toBe(failed - withoutStatement.length)
    expect(stats.totals.acquired).toBe(ITERATIONS - withoutStatement.length)

    await scope.close()
    expect(t.pool.ended).toBe(true)
  })
})
