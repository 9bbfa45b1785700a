/**
 * Session 4 review, part 2: probes of @scoped/drizzle against its README — a
 * db kept past its request while the connection serves another session,
 * call order and release: 'idle', a transaction callback that throws
 * synchronously, and a statement error caught inside db.transaction().
 */
import { createScope } from '@scoped/core'
import { scopedDrizzle } from '@scoped/drizzle'
import { pgDriver } from '@scoped/pg'
import { sql } from 'drizzle-orm'
import pg from 'pg'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import {
  committedRows,
  expectNoIdleInTransaction,
  expectPoolSettled,
  gate,
  uniqueAppName,
  waitFor,
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
  url = await testDatabase('drizzle_review_s4b')
  await independentQuery(url, NOTES_DDL)
  app = uniqueAppName('drizzle-s4b')
  // One connection: a kept db that ran would run on the next session's connection.
  pool = new pg.Pool({ connectionString: url, max: 1, application_name: app })
  scope = createScope({ driver: pgDriver(pool), default: false, name: 'drizzle-s4b' })
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

const settled = async () => {
  expectPoolSettled(pool)
  expect(scope.stats()).toMatchObject({ open: 0, holding: 0, waiting: 0 })
  await expectNoIdleInTransaction(url, app)
}

describe('a db call that outlives its request', () => {
  it('rejects with SessionClosedError (as the cause) while the next session holds the connection, and writes nothing', async () => {
    const ended = gate()
    let late: Promise<unknown> | undefined
    await scope.run(async () => {
      await db.insert(notes).values({ v: 'in-time' })
      // Not awaited: runs after the request ended, in its async context.
      late = ended.promise.then(() => db.insert(notes).values({ v: 'too-late' }))
    })
    const holding = gate()
    const inside = gate()
    const next = scope.run(async () => {
      await db.insert(notes).values({ v: 'next-session' })
      inside.open()
      await holding.promise
    })
    await inside.promise
    ended.open()
    const error = await late!.then(
      () => undefined,
      (e: unknown) => e,
    )
    expect(error).toBeDefined()
    const cause = (error as { cause?: unknown }).cause ?? error
    expect(cause).toMatchObject({ name: 'SessionClosedError' })
    holding.open()
    await next
    expect(await values()).toEqual(['in-time', 'next-session'])
    await settled()
  })
})

describe("release: 'idle' (transaction: 'none')", () => {
  it('concurrent statements run in call order on one connection; it goes back between bursts; db.transaction holds it to its end', async () => {
    await scope.run(
      async () => {
        const pids = await Promise.all(
          ['a', 'b', 'c'].map((v) =>
            db
              .insert(notes)
              .values({ v, pid: sql`pg_backend_pid()` })
              .returning({ pid: notes.pid }),
          ),
        )
        expect(new Set(pids.map(([r]) => r!.pid)).size).toBe(1)
        // Between bursts the connection is back in the pool.
        await waitFor('the idle release', () => scope.stats().holding === 0)
        expect(pool.idleCount).toBe(pool.totalCount)
        await expect(
          db.transaction(async (tx) => {
            await tx.insert(notes).values({ v: 'tx-1' })
            expect(scope.stats().holding).toBe(1)
            await tx.insert(notes).values({ v: 'tx-2' })
            throw new Error('undo the transaction')
          }),
        ).rejects.toThrow('undo the transaction')
      },
      { transaction: 'none', release: 'idle' },
    )
    expect(await values()).toEqual(['a', 'b', 'c'])
    await settled()
  })
})

describe('db.transaction(fn)', () => {
  it('a callback that throws synchronously (not async) rejects; the unit rolls its savepoint back and commits the rest', async () => {
    await scope.run(async () => {
      await db.insert(notes).values({ v: 'outer' })
      let p: Promise<unknown> | undefined
      expect(() => {
        p = db.transaction(((_tx: unknown) => {
          throw new Error('sync throw')
        }) as never)
      }).not.toThrow()
      await expect(p).rejects.toThrow('sync throw')
      await db.insert(notes).values({ v: 'after' })
    })
    expect(await values()).toEqual(['outer', 'after'])
    await settled()
  })

  // Was a bug (fixed): a statement whose error is caught inside db.transaction() aborts the savepoint; when fn
  // resolves, the core sends RELEASE SAVEPOINT (packages/core/src/session.ts:945,
  // `await driver.releaseSavepoint(conn, name)` in #nested), which PostgreSQL refuses with
  // 25P02 "current transaction is aborted"; the core neither rolls back to the savepoint nor
  // names the real failure. The user reads "current transaction is aborted" from
  // db.transaction(), and the outer unit, which the savepoint was there to protect, cannot
  // commit any more (its COMMIT answers ROLLBACK). Suggested fix: when releaseSavepoint fails,
  // ROLLBACK TO SAVEPOINT (run afterRollback hooks) and reject with a TransactionStateError
  // saying a statement inside the savepoint failed and its error was caught.
  it('a statement error caught inside it: the savepoint is rolled back and the outer unit commits', async () => {
    await scope.run(async () => {
      await db.insert(notes).values({ v: 'outer' })
      await db
        .transaction(async (tx) => {
          await tx.insert(notes).values({ v: 'inner' })
          await tx.execute(sql`SELECT 1/0`).catch(() => {})
        })
        .catch((e: Error) => {
          // Whatever the nested call says, it must not be PostgreSQL's 25P02.
          expect(e.message).not.toMatch(/current transaction is aborted/)
        })
      await db.insert(notes).values({ v: 'after' })
    })
    expect(await values()).toEqual(['outer', 'after'])
    await settled()
  })

  // Was a contract bug (docs fixed): the README and JSDoc said db.transaction() is always a
  // savepoint in 'auto'. As the handler's first statement it is the outermost transaction (the
  // core's rule, as @scoped/kysely's README says): it commits when fn resolves. Now documented.
  it("as the handler's first statement in 'auto', it is the outermost transaction (README): committed when fn returns, a later throw does not undo it", async () => {
    await expect(
      scope.run(async () => {
        await db.transaction(async (tx) => {
          await tx.insert(notes).values({ v: 'in-first-transaction' })
        })
        throw new Error('handler fails after it')
      }),
    ).rejects.toThrow('handler fails after it')
    expect(await values()).toEqual(['in-first-transaction'])
    await settled()
  })
})
