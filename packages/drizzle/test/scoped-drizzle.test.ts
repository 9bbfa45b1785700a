/**
 * What is particular to Drizzle: `db.transaction()` and `tx.rollback()` map
 * to the session's transaction (a savepoint inside the unit of work), its
 * config maps to BEGIN's options, and the db refuses to run outside a scope.
 */
import { createScope, NoActiveScopeError } from '@scoped/core'
import { scopedDrizzle } from '@scoped/drizzle'
import { pgDriver } from '@scoped/pg'
import { sql, TransactionRollbackError } from 'drizzle-orm'
import pg from 'pg'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import {
  committedRows,
  expectNoIdleInTransaction,
  expectPoolSettled,
  uniqueAppName,
} from '../../../test/foundation/support.ts'
import { NOTES_DDL } from '../../../test/orm/suite.ts'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import * as schema from './schema.ts'

const { notes } = schema
let url: string
let app: string
let pool: pg.Pool
let scope: ReturnType<typeof createScope<pg.PoolClient>>
let db: ReturnType<typeof scopedDrizzle<typeof schema>>

beforeAll(async () => {
  url = await testDatabase('drizzle_scoped')
  await independentQuery(url, NOTES_DDL)
  app = uniqueAppName('drizzle')
  pool = new pg.Pool({ connectionString: url, max: 2, application_name: app })
  scope = createScope({ driver: pgDriver(pool), default: false, name: 'drizzle' })
  db = scopedDrizzle(scope, { schema })
})

beforeEach(async () => {
  await independentQuery(url, 'TRUNCATE notes')
})

afterAll(async () => {
  await scope.close()
})

const values = async () =>
  (await committedRows<{ v: string }>(url, 'SELECT v FROM notes ORDER BY id')).map((r) => r.v)

describe('db.transaction() inside a session', () => {
  it('nests as savepoints; tx.rollback() and a throw undo only their part', async () => {
    await scope.run(async () => {
      await db.insert(notes).values({ v: 'outer' })
      await expect(
        db.transaction(async (tx) => {
          await tx.insert(notes).values({ v: 'rolled-back' })
          tx.rollback()
        }),
      ).rejects.toBeInstanceOf(TransactionRollbackError)
      await db.transaction(async (tx) => {
        await tx.insert(notes).values({ v: 'kept' })
        await expect(
          tx.transaction(async (inner) => {
            await inner.insert(notes).values({ v: 'inner-thrown' })
            throw new Error('inner')
          }),
        ).rejects.toThrow('inner')
      })
      // Relational queries run in the same unit of work and see the uncommitted rows.
      const seen = await db.query.notes.findMany({ orderBy: (n, { asc }) => [asc(n.id)] })
      expect(seen.map((n) => n.v)).toEqual(['outer', 'kept'])
    })
    expect(await values()).toEqual(['outer', 'kept'])
    expectPoolSettled(pool)
    await expectNoIdleInTransaction(url, app)
  })

  it("in transaction: 'none', db.transaction(fn, config) is a real BEGIN with Drizzle's config", async () => {
    await scope.run(
      async () => {
        await db.insert(notes).values({ v: 'autocommitted' })
        await db.transaction(
          async (tx) => {
            const { rows } =
              await tx.execute(sql`SELECT current_setting('transaction_isolation') AS level,
              current_setting('transaction_read_only') AS ro`)
            expect(rows[0]).toEqual({ level: 'repeatable read', ro: 'on' })
          },
          { isolationLevel: 'repeatable read', accessMode: 'read only' },
        )
        // Autocommit: visible to others before the scope ends.
        expect(await values()).toEqual(['autocommitted'])
      },
      { transaction: 'none' },
    )
    expectPoolSettled(pool)
  })
})

describe('outside a scope', () => {
  it('queries reject with NoActiveScopeError (as the cause of Drizzle’s query error)', async () => {
    const error = await db
      .select()
      .from(notes)
      .then(
        () => undefined,
        (e: unknown) => e,
      )
    const cause = (error as { cause?: unknown }).cause ?? error
    expect(cause).toBeInstanceOf(NoActiveScopeError)
    expect(pool.totalCount).toBe(pool.idleCount)
  })

  it('refuses a scope whose driver does not hand out pg clients', async () => {
    const other = createScope({
      driver: { name: 'fake', acquire: async () => ({}), release: () => {} },
      transaction: 'none',
      default: false,
    })
    expect(() => scopedDrizzle(other as never)).toThrow(
      /needs pg clients. Fix: createScope\(\{ driver: pgDriver\(pool\) \}\)/,
    )
    await other.close()
  })
})
