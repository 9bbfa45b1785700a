/**
 * What is particular to TypeORM: its own `transaction()` API inside a
 * session, the scoped manager's routing and refusals, a broken connection
 * destroyed instead of pooled, a transaction left open by hand, and a caught
 * statement error that would otherwise turn COMMIT into a silent ROLLBACK.
 */
import { createScope, NoActiveScopeError, TransactionStateError } from '@scoped/core'
import { currentManager, scopedManager, typeormDriver } from '@scoped/typeorm'
import type pg from 'pg'
import { DataSource } from 'typeorm'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import {
  committedRows,
  expectNoIdleInTransaction,
  uniqueAppName,
} from '../../../test/foundation/support.ts'
import { NOTES_DDL } from '../../../test/orm/suite.ts'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import { NoteSchema } from './note.ts'

let url: string
let app: string
let dataSource: DataSource
let pool: pg.Pool
let scope: ReturnType<typeof createScope<import('typeorm').QueryRunner>>
let db: ReturnType<typeof scopedManager>
const reported: unknown[] = []

beforeAll(async () => {
  url = await testDatabase('typeorm_driver')
  await independentQuery(url, NOTES_DDL)
  app = uniqueAppName('typeorm')
  dataSource = await new DataSource({
    type: 'postgres',
    url,
    entities: [NoteSchema],
    poolSize: 2,
    applicationName: app,
  }).initialize()
  pool = (dataSource.driver as unknown as { master: pg.Pool }).master
  scope = createScope({
    driver: typeormDriver(dataSource),
    default: false,
    name: 'typeorm',
    onError: (e) => reported.push(e),
  })
  db = scopedManager(scope)
})

beforeEach(async () => {
  await independentQuery(url, 'TRUNCATE notes')
  reported.length = 0
})

afterAll(async () => {
  await scope.close()
})

const values = async () =>
  (await committedRows<{ v: string }>(url, 'SELECT v FROM notes ORDER BY id')).map((r) => r.v)

describe('TypeORM transactions inside a session', () => {
  it("scopedManager.transaction(fn) nests as a savepoint, and so does TypeORM's own em.transaction()", async () => {
    await scope.run(async () => {
      await db.insert(NoteSchema, { v: 'outer' })
      await expect(
        db.transaction(async (em) => {
          await em.insert(NoteSchema, { v: 'scoped-inner' })
          throw new Error('undo scoped-inner')
        }),
      ).rejects.toThrow('undo scoped-inner')
      const em = await currentManager(scope)
      await expect(
        em.transaction(async (inner) => {
          await inner.insert(NoteSchema, { v: 'typeorm-inner' })
          throw new Error('undo typeorm-inner')
        }),
      ).rejects.toThrow('undo typeorm-inner')
      await em.transaction(async (inner) => {
        await inner.insert(NoteSchema, { v: 'typeorm-kept' })
      })
      await db.getRepository(NoteSchema).insert({ v: 'repository' })
    })
    expect(await values()).toEqual(['outer', 'typeorm-kept', 'repository'])
    expect(pool.totalCount).toBe(pool.idleCount)
  })

  it("in transaction: 'none', scopedManager.transaction(fn) is a real BEGIN … COMMIT on the session's connection", async () => {
    await scope.run(
      async () => {
        await db.insert(NoteSchema, { v: 'autocommitted' })
        await expect(
          db.transaction('SERIALIZABLE', async (em) => {
            await em.insert(NoteSchema, { v: 'rolled-back' })
            const [{ level }] = await em.query('SELECT current_setting($1) AS level', [
              'transaction_isolation',
            ])
            expect(level).toBe('serializable')
            throw new Error('roll it back')
          }),
        ).rejects.toThrow('roll it back')
      },
      { transaction: 'none' },
    )
    expect(await values()).toEqual(['autocommitted'])
  })
})

describe('the scoped manager', () => {
  it('throws NoActiveScopeError outside a scope, and refuses calls that would escape the session', async () => {
    await expect(db.find(NoteSchema)).rejects.toBeInstanceOf(NoActiveScopeError)
    expect(() => (db as unknown as { createQueryBuilder: unknown }).createQueryBuilder).toThrow(
      /createQueryBuilder is not available on the scoped manager. Fix: const em = await currentManager\(scope\)/,
    )
    // Calls that never touch the database work anywhere.
    expect(db.create(NoteSchema, { v: 'x' })).toEqual({ v: 'x' })
  })

  it('currentManager() query builders run in the unit of work', async () => {
    await scope.run(async () => {
      await db.insert(NoteSchema, { v: 'a' })
      const em = await currentManager(scope)
      const rows = await em
        .createQueryBuilder(NoteSchema, 'n')
        .where('n.v = :v', { v: 'a' })
        .getMany()
      expect(rows.map((r) => r.v)).toEqual(['a'])
      expect(em.queryRunner?.isTransactionActive).toBe(true)
    })
    expect(await values()).toEqual(['a'])
  })
})

describe('connections that must not be reused', () => {
  it('a backend terminated mid-request is destroyed, not returned; the next request gets a working one', async () => {
    let deadPid = 0
    const run = scope.run(async () => {
      await db.insert(NoteSchema, { v: 'lost' })
      ;[{ pid: deadPid }] = await db.query('SELECT pg_backend_pid() AS pid')
      await independentQuery(url, 'SELECT pg_terminate_backend($1)', [deadPid])
      await db.insert(NoteSchema, { v: 'after-terminate' })
    })
    // TypeORM itself releases a runner whose client errored, so the next statement says so.
    await expect(run).rejects.toThrow(/terminat|Query runner already released/)
    expect(scope.stats().totals.destroyed).toBeGreaterThanOrEqual(1)
    await scope.run(async () => {
      const [{ pid }] = await db.query('SELECT pg_backend_pid() AS pid')
      expect(pid).not.toBe(deadPid)
      await db.insert(NoteSchema, { v: 'fresh' })
    })
    expect(await values()).toEqual(['fresh'])
    expect(pool.totalCount).toBe(pool.idleCount)
    await expectNoIdleInTransaction(url, app)
  })

  it("a transaction opened by hand in transaction: 'none' and left open is destroyed at release, not pooled", async () => {
    let removed = 0
    const onRemove = () => {
      removed++
    }
    pool.on('remove', onRemove)
    await scope.run(
      async () => {
        const em = await currentManager(scope)
        await em.queryRunner!.startTransaction()
        await em.insert(NoteSchema, { v: 'never-committed' })
      },
      { transaction: 'none' },
    )
    expect(await values()).toEqual([])
    expect(pool.totalCount).toBe(pool.idleCount)
    await expectNoIdleInTransaction(url, app)
    // The release was a destroy (pg-pool dropped the client), not a return to the pool.
    pool.off('remove', onRemove)
    expect(removed).toBe(1)
  })

  it('a caught statement error makes the commit fail loudly instead of a silent ROLLBACK', async () => {
    const run = scope.run(async () => {
      await db.insert(NoteSchema, { v: 'doomed' })
      await db.query('SELECT 1 / 0').catch(() => {})
    })
    await expect(run).rejects.toBeInstanceOf(TransactionStateError)
    await expect(run).rejects.toThrow(
      /COMMIT was not sent: a statement in this transaction failed earlier/,
    )
    expect(await values()).toEqual([])
    expect(pool.totalCount).toBe(pool.idleCount)
    await expectNoIdleInTransaction(url, app)
  })
})
