/**
 * `release: 'idle'` with `transaction: 'none'`: a session gives its pooled
 * connection back whenever no statement runs and no transaction(fn) is open,
 * as `pool.query()` does, instead of holding it until its request or job ends.
 * A handler that queries, then waits on something else (an HTTP call, a
 * timer), then queries again, does not hold a connection while it waits.
 */
import { createScope } from '@scoped/core'
import { pgDriver, scopedPool } from '@scoped/pg'
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
} from './support.ts'

let url: string
let t: TestPool
let scope: ReturnType<typeof createScope<pg.PoolClient>>
let db: ReturnType<typeof scopedPool>

beforeAll(async () => {
  url = await testDatabase('foundation_release_idle')
  await createTable(url, 'events')
  // One connection: whoever holds it blocks everyone else.
  t = testPool(url, 'release_idle', { max: 1 })
  scope = createScope({
    driver: pgDriver(t.pool),
    default: false,
    name: 'idle-release',
    transaction: 'none',
    release: 'idle',
    acquireTimeoutMs: 2_000,
  })
  db = scopedPool(scope)
})

afterAll(async () => {
  await scope.close()
})

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

describe("release: 'idle'", () => {
  it('between two statements of one request the connection is back in the pool', async () => {
    await scope.run(async () => {
      await db.query("INSERT INTO events (v) VALUES ('first')")
      expectPoolSettled(t.pool)
      expect(t.pool.totalCount).toBe(1)
      await db.query("INSERT INTO events (v) VALUES ('second')")
      expectPoolSettled(t.pool)
    })
    expect((await committedRows(url, 'SELECT v FROM events ORDER BY id')).map((r) => r.v)).toEqual(
      expect.arrayContaining(['first', 'second']),
    )
    await expectNoIdleInTransaction(url, t.app)
  })

  it('a request waiting between its statements does not block another on a pool of one', async () => {
    const order: string[] = []
    const slow = scope.run(
      async () => {
        await db.query('SELECT 1')
        order.push('slow: first statement')
        await sleep(300) // e.g. an HTTP call to another service: no connection held meanwhile
        await db.query('SELECT 1')
        order.push('slow: second statement')
      },
      { name: 'GET /slow' },
    )
    await sleep(50)
    const fast = scope.run(
      async () => {
        await db.query("INSERT INTO events (v) VALUES ('fast')")
        order.push('fast: done')
      },
      { name: 'POST /fast' },
    )
    await Promise.all([slow, fast])
    expect(order).toEqual(['slow: first statement', 'fast: done', 'slow: second statement'])
    expectPoolSettled(t.pool)
  })

  it('transaction(fn) keeps one backend from BEGIN to COMMIT; its rows commit together', async () => {
    const pids = await scope.run(async () => {
      const s = scope.getSession()
      return s.transaction(async () => {
        const a = await db.query<{ pid: number }>(
          "INSERT INTO events (v) VALUES ('tx-a') RETURNING pg_backend_pid() AS pid",
        )
        const b = await db.query<{ pid: number; xact: boolean }>(
          "INSERT INTO events (v) VALUES ('tx-b') RETURNING pg_backend_pid() AS pid, now() = statement_timestamp() AS xact",
        )
        // Inside the transaction, now() is the transaction's start, not this statement's.
        expect(b.rows[0]!.xact).toBe(false)
        expect(t.pool.idleCount).toBe(0)
        return [a.rows[0]!.pid, b.rows[0]!.pid]
      })
    })
    expect(pids[0]).toBe(pids[1])
    expectPoolSettled(t.pool)
    expect(
      (await committedRows(url, "SELECT v FROM events WHERE v LIKE 'tx-%' ORDER BY id")).map(
        (r) => r.v,
      ),
    ).toEqual(['tx-a', 'tx-b'])
  })

  it('a backend killed between statements costs that statement only: the next one gets a new connection', async () => {
    const outcome = await scope.run(async () => {
      const { rows } = await db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
      const killed = rows[0]!.pid
      // The connection is back in the pool (idle) when the server ends it.
      await independentQuery(url, 'SELECT pg_terminate_backend($1)', [killed])
      await sleep(100)
      const again = await db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
      expect(again.rows[0]!.pid).not.toBe(killed)
      return scope.getSession()
    })
    expect(outcome.outcome).toBe('committed')
    expectPoolSettled(t.pool)
  })
})
