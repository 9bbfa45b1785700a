/**
 * Nesting against a real PostgreSQL: transaction(fn) inside a transaction is a
 * SAVEPOINT; an inner throw undoes only the inner writes and drops the hooks
 * registered inside it; afterCommit hooks run after the real COMMIT (an
 * independent connection already sees the rows), in order, and a failing
 * hook is reported without failing the commit.
 */
import { createScope } from '@scoped/core'
import { pgDriver } from '@scoped/pg'
import type pg from 'pg'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { testDatabase } from '../support/db.ts'
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
const reported: { error: unknown; during: string; session?: string }[] = []

beforeAll(async () => {
  url = await testDatabase('foundation_savepoints')
  await createTable(url, 'ledger')
  t = testPool(url, 'savepoints', { max: 2 })
  scope = createScope({
    driver: pgDriver(t.pool),
    default: false,
    name: 'savepoints',
    onError: (error, ctx) => reported.push({ error, ...ctx }),
  })
})

beforeEach(async () => {
  await committedRows(url, 'TRUNCATE ledger')
  reported.length = 0
})

afterAll(async () => {
  await scope.close()
})

const insert = (v: string) =>
  scope.getSession().use((c) => c.query('INSERT INTO ledger (v) VALUES ($1)', [v]))

const committedValues = async () =>
  (await committedRows<{ v: string }>(url, 'SELECT v FROM ledger ORDER BY id')).map((r) => r.v)

class Inner extends Error {}

describe.each(['auto', 'none'] as const)("savepoints (scope transaction: '%s')", (mode) => {
  // In 'auto' the run is the unit of work; in 'none' an explicit outer transaction(fn) is.
  const unitOfWork = (fn: () => Promise<void>) =>
    scope.run(mode === 'auto' ? fn : () => scope.getSession().transaction(fn), {
      name: `ledger-${mode}`,
      transaction: mode,
    })

  it('an inner throw rolls back only the inner writes and drops its afterCommit hooks', async () => {
    const ran: string[] = []
    const seenByHooks: string[][] = []
    await unitOfWork(async () => {
      const s = scope.getSession()
      await insert('outer-1')
      s.afterCommit(async () => {
        ran.push('outer-hook-1')
        // Runs after the real COMMIT: an independent connection already sees the rows.
        seenByHooks.push(await committedValues())
      })
      const inner = s.transaction(async () => {
        await insert('inner')
        s.afterCommit(() => {
          ran.push('inner-hook')
        })
        throw new Inner('undo the inner part')
      })
      await expect(inner).rejects.toBeInstanceOf(Inner)
      await s.transaction(async () => {
        await insert('kept-savepoint')
        s.afterCommit(() => {
          ran.push('kept-savepoint-hook')
        })
      })
      await insert('outer-2')
      s.afterCommit(() => {
        ran.push('outer-hook-2')
      })
      expect(ran).toEqual([])
    })
    expect(await committedValues()).toEqual(['outer-1', 'kept-savepoint', 'outer-2'])
    expect(ran).toEqual(['outer-hook-1', 'kept-savepoint-hook', 'outer-hook-2'])
    expect(seenByHooks).toEqual([['outer-1', 'kept-savepoint', 'outer-2']])
    expect(reported).toEqual([])
    expectPoolSettled(t.pool)
    await expectNoIdleInTransaction(url, t.app)
  })

  it('savepoints nest: a throw two levels down keeps the middle level', async () => {
    await unitOfWork(async () => {
      const s = scope.getSession()
      await insert('top')
      await s.transaction(async () => {
        await insert('middle')
        await s
          .transaction(async () => {
            await insert('bottom')
            throw new Inner('bottom fails')
          })
          .catch((e) => {
            if (!(e instanceof Inner)) throw e
          })
        await insert('middle-after')
      })
    })
    expect(await committedValues()).toEqual(['top', 'middle', 'middle-after'])
  })

  it('an SQL error inside a savepoint is recoverable: the outer unit of work still commits', async () => {
    await unitOfWork(async () => {
      const s = scope.getSession()
      await insert('before')
      const failing = s.transaction(async () => {
        await insert('doomed')
        await s.use((c) => c.query('SELECT 1 / 0'))
      })
      await expect(failing).rejects.toMatchObject({ code: '22012' })
      await insert('after')
    })
    expect(await committedValues()).toEqual(['before', 'after'])
    expectPoolSettled(t.pool)
  })

  it('a failing afterCommit hook is reported via onError and does not fail the commit', async () => {
    const ran: string[] = []
    const result = await unitOfWork(async () => {
      const s = scope.getSession()
      await insert('committed anyway')
      s.afterCommit(() => {
        throw new Error('webhook down')
      })
      s.afterCommit(() => {
        ran.push('second hook still runs')
      })
    })
    expect(result).toBeUndefined()
    expect(await committedValues()).toEqual(['committed anyway'])
    expect(ran).toEqual(['second hook still runs'])
    expect(reported).toHaveLength(1)
    expect((reported[0]!.error as Error).message).toBe('webhook down')
    expect(reported[0]!.during).toBe('afterCommit')
    expect(reported[0]!.session).toBe(`ledger-${mode}`)
    expectPoolSettled(t.pool)
  })

  it('an outer throw rolls back everything, kept savepoints included, and runs no afterCommit', async () => {
    const ran: string[] = []
    const run = unitOfWork(async () => {
      const s = scope.getSession()
      await insert('a')
      await s.transaction(async () => {
        await insert('b')
        s.afterCommit(() => {
          ran.push('commit')
        })
      })
      s.afterRollback(() => {
        ran.push('rollback')
      })
      throw new Error('outer fails')
    })
    await expect(run).rejects.toThrow('outer fails')
    expect(await committedValues()).toEqual([])
    expect(ran).toEqual(['rollback'])
    expectPoolSettled(t.pool)
    await expectNoIdleInTransaction(url, t.app)
  })
})
