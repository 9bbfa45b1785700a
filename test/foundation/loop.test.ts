/**
 * scope.loop(): a worker loop where each iteration is its own job (own
 * session, own unit of work). A failing iteration is rolled back, reported
 * through onError and followed by a backoff; it never ends the loop.
 * Aborting the signal lets the current iteration finish (and commit), then
 * the loop's promise resolves.
 */
import { createScope } from '@scoped/core'
import { pgDriver } from '@scoped/pg'
import { beforeAll, describe, expect, it } from 'vitest'
import { testDatabase } from '../support/db.ts'
import {
  committedRows,
  createTable,
  expectNoIdleInTransaction,
  expectPoolSettled,
  testPool,
} from './support.ts'

let url: string

beforeAll(async () => {
  url = await testDatabase('foundation_loop')
  await createTable(url, 'ticks', 'n int NOT NULL')
})

describe('scope.loop()', () => {
  it('runs iterations as jobs, survives failures with backoff, stops after the current iteration on abort', async () => {
    const t = testPool(url, 'loop', { max: 2 })
    const reported: { message: string; during: string }[] = []
    const scope = createScope({
      driver: pgDriver(t.pool),
      default: false,
      name: 'worker',
      onError: (e, { during }) => reported.push({ message: (e as Error).message, during }),
    })
    const ac = new AbortController()
    const sessions: { id: string; name: string }[] = []
    const startedAt: number[] = []
    let i = 0
    try {
      const looping = scope.loop(
        async () => {
          const n = i++
          startedAt.push(performance.now())
          const s = scope.getSession()
          sessions.push({ id: s.id, name: s.name })
          await s.use((c) => c.query('INSERT INTO ticks (n) VALUES ($1)', [n]))
          if (n === 2 || n === 3) throw new Error(`iteration ${n} failed`)
          if (n === 6) {
            // Stop asked mid-iteration: this iteration still finishes and commits.
            ac.abort()
            await s.use((c) => c.query('SELECT pg_sleep(0.05)'))
            await s.use((c) => c.query('UPDATE ticks SET n = 60 WHERE n = 6'))
          }
        },
        { signal: ac.signal, name: 'poll', backoff: { initialMs: 50, maxMs: 80 } },
      )
      await looping
      expect(i).toBe(7)

      // Each iteration was a job with a session of its own.
      expect(new Set(sessions.map((s) => s.id)).size).toBe(7)
      expect(sessions.every((s) => s.name === 'job:poll')).toBe(true)

      // The failures were reported with their count, and rolled back.
      expect(reported).toEqual([
        { message: 'iteration 2 failed', during: 'loop iteration (job:poll, failure 1 in a row)' },
        { message: 'iteration 3 failed', during: 'loop iteration (job:poll, failure 2 in a row)' },
      ])
      const rows = await committedRows<{ n: number }>(url, 'SELECT n FROM ticks ORDER BY n')
      expect(rows.map((r) => r.n)).toEqual([0, 1, 4, 5, 60])

      // Backed off after each failure (initialMs, then doubled up to maxMs); a lower bound only.
      expect(startedAt[3]! - startedAt[2]!).toBeGreaterThanOrEqual(45)
      expect(startedAt[4]! - startedAt[3]!).toBeGreaterThanOrEqual(75)

      expect(scope.stats().totals).toMatchObject({ committed: 5, rolledBack: 2, destroyed: 0 })
      expectPoolSettled(t.pool)
      await expectNoIdleInTransaction(url, t.app)
    } finally {
      await scope.close()
    }
  })

  it('an abort during the backoff ends the loop at once', async () => {
    const t = testPool(url, 'loop_backoff', { max: 1 })
    const scope = createScope({ driver: pgDriver(t.pool), default: false, onError: () => {} })
    const ac = new AbortController()
    let runs = 0
    try {
      const looping = scope.loop(
        async () => {
          runs++
          await scope.getSession().use((c) => c.query('SELECT 1'))
          throw new Error('always fails')
        },
        { signal: ac.signal, backoff: { initialMs: 60_000, maxMs: 60_000 } },
      )
      while (runs === 0 || scope.stats().open > 0) await new Promise((r) => setTimeout(r, 5))
      ac.abort()
      await looping
      expect(runs).toBe(1)
      expectPoolSettled(t.pool)
    } finally {
      await scope.close()
    }
  })

  it('scope.close() ends a running loop after its current iteration', async () => {
    const t = testPool(url, 'loop_close', { max: 1 })
    const scope = createScope({ driver: pgDriver(t.pool), default: false })
    let runs = 0
    const looping = scope.loop(
      async () => {
        runs++
        await scope.getSession().use((c) => c.query('INSERT INTO ticks (n) VALUES (1000)'))
        await new Promise((r) => setTimeout(r, 20))
      },
      { signal: new AbortController().signal, name: 'until-close' },
    )
    while (runs < 2) await new Promise((r) => setTimeout(r, 5))
    await scope.close()
    await looping
    const committed = await committedRows(
      url,
      'SELECT count(*)::int AS n FROM ticks WHERE n = 1000',
    )
    // Every iteration that started finished and committed; none ran after close.
    expect(committed[0].n).toBe(runs)
    expect(t.pool.ended).toBe(true)
  })
})
