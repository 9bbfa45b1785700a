/**
 * A statement fails, the code catches the error and carries on, the scope
 * resolves. PostgreSQL has aborted the transaction, so it answers COMMIT with
 * the command tag ROLLBACK (and no error). The run must not report success:
 * it rejects with TransactionStateError, and nothing is committed.
 */
import { createScope, TransactionStateError } from '@scoped/core'
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

beforeAll(async () => {
  url = await testDatabase('foundation_caught_error')
  await createTable(url, 'orders', 'v text UNIQUE')
  t = testPool(url, 'caught_error', { max: 2 })
  scope = createScope({ driver: pgDriver(t.pool), default: false, name: 'caught-error' })
})

beforeEach(async () => {
  await committedRows(url, 'TRUNCATE orders')
})

afterAll(async () => {
  await scope.close()
})

const query = (sql: string, values?: unknown[]) =>
  scope.getSession().use((c) => c.query(sql, values))

/** The mistake under test: swallow a failed statement and go on as if nothing happened. */
async function writeAndSwallowAFailure(): Promise<string> {
  await query("INSERT INTO orders (v) VALUES ('first')")
  try {
    await query("INSERT INTO orders (v) VALUES ('first')") // unique violation
  } catch {
    // "it's fine, it already exists"
  }
  return 'handler thinks it succeeded'
}

describe('a caught statement error inside the unit of work', () => {
  it("scope.run rejects with TransactionStateError and commits nothing ('auto')", async () => {
    const before = scope.stats().totals
    const err = await scope.run(writeAndSwallowAFailure, { name: 'POST /orders' }).catch((e) => e)
    expect(err).toBeInstanceOf(TransactionStateError)
    expect(err.code).toBe('TRANSACTION_STATE')
    expect(err.message).toContain('COMMIT was turned into ROLLBACK')
    expect(err.message).toContain('Fix:')
    expect(await committedRows(url, 'SELECT v FROM orders')).toEqual([])
    const after = scope.stats().totals
    expect(after.committed - before.committed).toBe(0)
    expect(after.rolledBack - before.rolledBack).toBe(1)
    // The connection itself is fine (the server ended the transaction): it went back, not destroyed.
    expect(after.destroyed - before.destroyed).toBe(0)
    expectPoolSettled(t.pool)
    await expectNoIdleInTransaction(url, t.app)
  })

  it('an explicit transaction(fn) rejects the same way (transaction: none)', async () => {
    const err = await scope
      .run(() => scope.getSession().transaction(writeAndSwallowAFailure), {
        name: 'POST /orders (explicit)',
        transaction: 'none',
      })
      .catch((e) => e)
    expect(err).toBeInstanceOf(TransactionStateError)
    expect(await committedRows(url, 'SELECT v FROM orders')).toEqual([])
    expectPoolSettled(t.pool)
  })

  it('session.commit() rejects the same way, and the next unit of work commits normally', async () => {
    const outcome = await scope.run(
      async () => {
        await writeAndSwallowAFailure()
        const err = await scope
          .getSession()
          .commit()
          .catch((e) => e)
        // After the failed commit the next statement begins a new transaction.
        await query("INSERT INTO orders (v) VALUES ('second')")
        return err
      },
      { name: 'job:two-units' },
    )
    expect(outcome).toBeInstanceOf(TransactionStateError)
    expect((await committedRows(url, 'SELECT v FROM orders')).map((r) => r.v)).toEqual(['second'])
    expectPoolSettled(t.pool)
    await expectNoIdleInTransaction(url, t.app)
  })

  it('the afterCommit hooks of the failed unit of work do not run; its afterRollback hooks do', async () => {
    const ran: string[] = []
    await scope
      .run(async () => {
        scope.getSession().afterCommit(() => {
          ran.push('commit')
        })
        scope.getSession().afterRollback(() => {
          ran.push('rollback')
        })
        return writeAndSwallowAFailure()
      })
      .catch(() => {})
    expect(ran).toEqual(['rollback'])
  })
})
