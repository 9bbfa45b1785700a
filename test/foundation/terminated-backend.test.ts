/**
 * Problem 5 of the design: a connection killed under a session
 * (pg_terminate_backend, as a server restart or a DBA would) must fail that
 * scope clearly, never crash the process, never go back to the pool, and
 * never poison the next scope.
 */
import { createScope, TransactionStateError } from '@scoped/core'
import { pgDriver } from '@scoped/pg'
import type pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../support/db.ts'
import {
  committedRows,
  createTable,
  expectNoIdleInTransaction,
  expectPoolSettled,
  type TestPool,
  testPool,
  waitFor,
} from './support.ts'

let url: string
let t: TestPool
let scope: ReturnType<typeof createScope<pg.PoolClient>>
const reported: { error: unknown; during: string }[] = []

beforeAll(async () => {
  url = await testDatabase('foundation_terminate')
  await createTable(url, 'events')
  t = testPool(url, 'terminate', { max: 3 })
  scope = createScope({
    driver: pgDriver(t.pool),
    default: false,
    name: 'terminate',
    onError: (error, { during }) => reported.push({ error, during }),
  })
})

afterAll(async () => {
  await scope.close()
})

const pidOf = async (c: pg.PoolClient) =>
  (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid

async function terminate(pid: number): Promise<void> {
  await independentQuery(url, 'SELECT pg_terminate_backend($1)', [pid])
  await waitFor(
    `backend ${pid} to exit`,
    async () =>
      (await independentQuery(url, 'SELECT 1 FROM pg_stat_activity WHERE pid = $1', [pid]))
        .length === 0,
  )
}

async function nextScopeWorks(): Promise<void> {
  const pids = new Set<number>()
  for (let i = 0; i < 3; i++) {
    await scope.run(async () => {
      const s = scope.getSession()
      pids.add(await s.use(pidOf))
      await s.use((c) => c.query("INSERT INTO events (v) VALUES ('after')"))
    })
  }
  expect(pids.size).toBeGreaterThan(0)
}

describe('a backend terminated mid-scope', () => {
  it('between statements: the next statement fails, the client is destroyed, the next scope works', async () => {
    const before = scope.stats().totals.destroyed
    let pid = 0
    const run = scope.run(
      async () => {
        const s = scope.getSession()
        pid = await s.use(pidOf)
        await s.use((c) => c.query("INSERT INTO events (v) VALUES ('lost')"))
        await terminate(pid)
        await s.use((c) => c.query("INSERT INTO events (v) VALUES ('never')"))
      },
      { name: 'POST /events' },
    )
    const err = await run.catch((e) => e)
    expect(err).toBeInstanceOf(Error)
    expect(String(err.message)).toMatch(/terminat|connection error|not queryable/i)

    expect(scope.stats().totals.destroyed - before).toBe(1)
    expect(scope.stats().holding).toBe(0)
    expectPoolSettled(t.pool)
    expect(t.pool.totalCount).toBe(0)
    await nextScopeWorks()
    expect(await committedRows(url, "SELECT v FROM events WHERE v IN ('lost', 'never')")).toEqual(
      [],
    )
    expectPoolSettled(t.pool)
    await expectNoIdleInTransaction(url, t.app)
  })

  it('during a running statement: the statement fails, the client is destroyed', async () => {
    const before = scope.stats().totals.destroyed
    const totalBefore = t.pool.totalCount
    const run = scope.run(
      async () => {
        const s = scope.getSession()
        const pid = await s.use(pidOf)
        const sleeping = s.use((c) => c.query('SELECT pg_sleep(30)'))
        // Handled here; awaited (and rethrown) below once the backend is gone.
        sleeping.catch(() => {})
        await waitFor('the sleep to start', async () => {
          const rows = await independentQuery(
            url,
            "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND query LIKE '%pg_sleep%' AND state = 'active'",
            [pid],
          )
          return rows.length === 1
        })
        await independentQuery(url, 'SELECT pg_terminate_backend($1)', [pid])
        await sleeping
      },
      { name: 'GET /slow' },
    )
    const err = await run.catch((e) => e)
    expect(err).toBeInstanceOf(Error)
    expect(String(err.message)).toMatch(/terminat/i)
    expect(scope.stats().totals.destroyed - before).toBe(1)
    // The dead client left the pool; the survivors are idle in it.
    expect(t.pool.totalCount).toBe(totalBefore - 1)
    expectPoolSettled(t.pool)
    await nextScopeWorks()
    expectPoolSettled(t.pool)
  })

  it('with no statement after it: the COMMIT fails, the run rejects, the client is destroyed', async () => {
    const before = scope.stats().totals.destroyed
    const run = scope.run(
      async () => {
        const s = scope.getSession()
        const pid = await s.use(pidOf)
        await s.use((c) => c.query("INSERT INTO events (v) VALUES ('uncommitted')"))
        await terminate(pid)
      },
      { name: 'PUT /events' },
    )
    const err = await run.catch((e) => e)
    expect(err).toBeInstanceOf(TransactionStateError)
    expect(err.message).toContain('COMMIT was not sent')
    expect(err.message).toContain('terminating connection due to administrator command')
    expect(err.message).toContain('nothing was committed')
    expect(scope.stats().totals.destroyed - before).toBe(1)
    expectPoolSettled(t.pool)
    await nextScopeWorks()
    expect(await committedRows(url, "SELECT v FROM events WHERE v = 'uncommitted'")).toEqual([])
    await expectNoIdleInTransaction(url, t.app)
  })

  it('reports nothing as an unhandled error', () => {
    // Errors the scope could not throw go to onError; a dead connection is not one of them.
    expect(reported.map((r) => r.during)).toEqual([])
  })
})
