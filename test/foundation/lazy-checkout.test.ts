/**
 * Lazy checkout against a real PostgreSQL: a scope that never touches the
 * database checks out nothing, and concurrent first statements of one session
 * share a single checkout (one backend).
 */
import { createScope } from '@scoped/core'
import { pgDriver, serial } from '@scoped/pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { backends, testDatabase } from '../support/db.ts'
import { expectNoIdleInTransaction, expectPoolSettled, type TestPool, testPool } from './support.ts'

let url: string
let t: TestPool
let scope: ReturnType<typeof createScope<import('pg').PoolClient>>

beforeAll(async () => {
  url = await testDatabase('foundation_lazy')
  t = testPool(url, 'lazy', { max: 5 })
  scope = createScope({ driver: pgDriver(t.pool), default: false, name: 'lazy' })
})

afterAll(async () => {
  await scope.close()
})

describe('lazy checkout', () => {
  it('a scope that never uses the database checks out no connection', async () => {
    let hookRan = false
    const state = await scope.run(
      async () => {
        const session = scope.getSession()
        // An afterCommit in an empty unit of work still runs at its end, without a connection.
        session.afterCommit(() => {
          hookRan = true
        })
        await new Promise((r) => setTimeout(r, 5))
        return session.state
      },
      { name: 'no-db' },
    )
    expect(state).toBe('idle')
    expect(hookRan).toBe(true)
    expect(scope.stats().totals.acquired).toBe(0)
    expect(t.connects()).toBe(0)
    expect(t.pool.totalCount).toBe(0)
    expect(await backends(url, t.app)).toEqual([])
  })

  it('ten concurrent first queries in one session check out exactly one connection', async () => {
    const acquiredBefore = scope.stats().totals.acquired
    const connectsBefore = t.connects()
    const pids = await scope.run(
      async () => {
        const session = scope.getSession()
        return Promise.all(
          Array.from({ length: 10 }, () =>
            session.use(async (c) => {
              // serial(): one statement at a time on a client, as scopedPool does.
              const { rows } = await serial(c, () =>
                c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid'),
              )
              return rows[0]!.pid
            }),
          ),
        )
      },
      { name: 'ten-at-once' },
    )
    expect(new Set(pids).size).toBe(1)
    expect(scope.stats().totals.acquired - acquiredBefore).toBe(1)
    expect(t.connects() - connectsBefore).toBe(1)
    expectPoolSettled(t.pool)
    await expectNoIdleInTransaction(url, t.app)
  })

  it('ten concurrent connection() calls in one session resolve to the same client', async () => {
    const acquiredBefore = scope.stats().totals.acquired
    const same = await scope.run(async () => {
      const session = scope.getSession()
      const clients = await Promise.all(Array.from({ length: 10 }, () => session.connection()))
      return clients.every((c) => c === clients[0])
    })
    expect(same).toBe(true)
    expect(scope.stats().totals.acquired - acquiredBefore).toBe(1)
    expectPoolSettled(t.pool)
  })
})
