/**
 * transaction(fn, { isolation: 'serializable', retry }) against a real 40001:
 * the classic write skew (two doctors on call, each goes off call if the
 * other is still on). Under SERIALIZABLE, PostgreSQL aborts one of the two
 * with a serialization failure; the retry re-runs fn from BEGIN, where it
 * now sees the other's committed change and keeps the invariant.
 */
import { createScope } from '@scoped/core'
import { pgDriver } from '@scoped/pg'
import type pg from 'pg'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { testDatabase } from '../support/db.ts'
import {
  committedRows,
  expectNoIdleInTransaction,
  expectPoolSettled,
  gate,
  type TestPool,
  testPool,
} from './support.ts'

let url: string
let t: TestPool
let scope: ReturnType<typeof createScope<pg.PoolClient>>

beforeAll(async () => {
  url = await testDatabase('foundation_serializable')
  await committedRows(url, 'CREATE TABLE doctors (name text PRIMARY KEY, on_call boolean NOT NULL)')
  t = testPool(url, 'serializable', { max: 4 })
  scope = createScope({ driver: pgDriver(t.pool), default: false, name: 'serializable' })
})

beforeEach(async () => {
  await committedRows(url, 'DROP TABLE IF EXISTS counters')
  await committedRows(url, 'CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL)')
  await committedRows(url, 'INSERT INTO counters VALUES (1, 0)')
  await committedRows(url, 'TRUNCATE doctors')
  await committedRows(url, "INSERT INTO doctors VALUES ('alice', true), ('bob', true)")
})

afterAll(async () => {
  await scope.close()
})

/** Both doctors try to go off call at once; both read before either writes. */
function offCallRace(mode: 'auto' | 'none', attempts: number) {
  const bothRead = { alice: gate(), bob: gate() }
  const runs = { alice: 0, bob: 0 }
  const goOffCall = (me: 'alice' | 'bob') =>
    scope.run(
      () =>
        scope.getSession().transaction(
          async () => {
            runs[me]++
            const s = scope.getSession()
            const { rows } = await s.use((c) =>
              c.query<{ n: number }>('SELECT count(*)::int AS n FROM doctors WHERE on_call'),
            )
            if (runs[me] === 1) {
              // First attempt: wait until the other one has read too, so the skew is real.
              bothRead[me].open()
              await bothRead[me === 'alice' ? 'bob' : 'alice'].promise
            }
            if (rows[0]!.n < 2) return 'stayed on call'
            await s.use((c) => c.query('UPDATE doctors SET on_call = false WHERE name = $1', [me]))
            return 'went off call'
          },
          { isolation: 'serializable', retry: { attempts, backoffMs: 5 } },
        ),
      { name: `off-call:${me}`, transaction: mode },
    )
  return { runs, results: Promise.allSettled([goOffCall('alice'), goOffCall('bob')]) }
}

describe.each(['auto', 'none'] as const)("serializable retry (scope transaction: '%s')", (mode) => {
  it('re-runs fn on a real 40001 and keeps the invariant', async () => {
    const { runs, results } = offCallRace(mode, 3)
    const settled = await results
    expect(settled.map((r) => r.status)).toEqual(['fulfilled', 'fulfilled'])
    const outcomes = settled.map((r) => (r as PromiseFulfilledResult<string>).value).sort()
    expect(outcomes).toEqual(['stayed on call', 'went off call'])
    // One of the two hit the serialization failure and ran again.
    expect(runs.alice + runs.bob).toBeGreaterThan(2)
    const onCall = await committedRows(url, 'SELECT name FROM doctors WHERE on_call')
    expect(onCall).toHaveLength(1)
    expectPoolSettled(t.pool)
    await expectNoIdleInTransaction(url, t.app)
  })

  it('without retry the same race fails with 40001 and commits only the winner', async () => {
    const { runs, results } = offCallRace(mode, 1)
    const settled = await results
    const rejected = settled.filter((r) => r.status === 'rejected')
    expect(rejected).toHaveLength(1)
    expect((rejected[0] as PromiseRejectedResult).reason).toMatchObject({ code: '40001' })
    expect(runs).toEqual({ alice: 1, bob: 1 })
    expect(await committedRows(url, 'SELECT name FROM doctors WHERE on_call')).toHaveLength(1)
    expectPoolSettled(t.pool)
    await expectNoIdleInTransaction(url, t.app)
  })

  it('a read-then-write increment raced by another: the 40001 comes from the UPDATE; no update is lost', async () => {
    const bothRead = { a: gate(), b: gate() }
    const runs = { a: 0, b: 0 }
    const increment = (me: 'a' | 'b') =>
      scope.run(
        () =>
          scope.getSession().transaction(
            async () => {
              runs[me]++
              const s = scope.getSession()
              const { rows } = await s.use((c) =>
                c.query<{ n: number }>('SELECT n FROM counters WHERE id = 1'),
              )
              if (runs[me] === 1) {
                bothRead[me].open()
                await bothRead[me === 'a' ? 'b' : 'a'].promise
              }
              await s.use((c) =>
                c.query('UPDATE counters SET n = $1 WHERE id = 1', [rows[0]!.n + 1]),
              )
            },
            { isolation: 'serializable', retry: { attempts: 3, backoffMs: 5 } },
          ),
        { name: `increment:${me}`, transaction: mode },
      )
    await Promise.all([increment('a'), increment('b')])
    expect(runs.a + runs.b).toBe(3)
    expect(await committedRows(url, 'SELECT n FROM counters')).toEqual([{ n: 2 }])
    expectPoolSettled(t.pool)
    await expectNoIdleInTransaction(url, t.app)
  })
})
