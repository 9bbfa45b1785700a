/**
 * Session 4 review, part 2: probes of @scoped/kysely not covered by
 * review-s4.test.ts — a stream whose loop body throws, a stream whose query
 * fails mid-way as the unit's first statement, and a statement error caught
 * inside db.transaction() (a savepoint).
 */
import { PostgresDialect, sql } from 'kysely'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { independentQuery } from '../../../test/support/db.ts'
import { ChunkedCursor, type Fixture, fixture } from './support.ts'

let f: Fixture

beforeAll(async () => {
  f = await fixture('kysely_review_s4b', {
    dialect: (pool) => new PostgresDialect({ pool, cursor: ChunkedCursor }),
    max: 2,
  })
})

afterEach(async () => {
  expect(await f.idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  expect(f.scope.stats()).toMatchObject({ open: 0, holding: 0, waiting: 0 })
  await independentQuery(f.url, 'TRUNCATE orders')
})

afterAll(async () => {
  await f.close()
})

describe('stream() in the unit of work', () => {
  it('a loop body that throws mid-stream: the scope rejects with that error, nothing commits, the connection goes back', async () => {
    const { db, scope } = f
    const run = scope.run(async () => {
      await db.insertInto('orders').values({ note: 'before-stream' }).execute()
      for await (const row of db.selectFrom('items').select('n').stream(5)) {
        if (row.n === 12) throw new Error('body failed at 12')
      }
    })
    await expect(run).rejects.toThrow('body failed at 12')
    expect(await f.notes()).toEqual([])
    // The connection is usable for the next unit of work.
    await scope.run(async () => {
      await db.insertInto('orders').values({ note: 'next' }).execute()
    })
    expect(await f.notes()).toEqual(['next'])
  })

  it("a stream that fails on the server as the unit's first statement reports its own error, not 'current transaction is aborted'", async () => {
    const { db, scope } = f
    const run = scope.run(async () => {
      const seen: number[] = []
      for await (const row of db
        .selectFrom('items')
        .select(sql<number>`100 / (n - 50)`.as('q'))
        .stream(5)) {
        seen.push(row.q)
      }
      return seen
    })
    await expect(run).rejects.toThrow(/division by zero/)
    await scope.run(async () => {
      await db.insertInto('orders').values({ note: 'after' }).execute()
    })
    expect(await f.notes()).toEqual(['after'])
  })
})

describe('a statement error caught inside db.transaction() (a savepoint)', () => {
  // Was a bug (core, shared with @scoped/drizzle, see packages/drizzle/test/review-s4b.test.ts; fixed): fn
  // resolves after catching its statement's error; the core sends RELEASE SAVEPOINT on the aborted
  // savepoint (#nested, packages/core/src/session.ts:945), PostgreSQL answers 25P02, and no ROLLBACK TO
  // SAVEPOINT follows: db.transaction() rejects with "current transaction is aborted" and the
  // outer unit can no longer commit (the scope rejects with TransactionStateError at COMMIT).
  it('the savepoint is rolled back, the caller reads no 25P02, and the outer unit commits', async () => {
    const { db, scope } = f
    await scope.run(async () => {
      await db.insertInto('orders').values({ note: 'outer' }).execute()
      const nested = await db
        .transaction()
        .execute(async (trx) => {
          await trx.insertInto('orders').values({ note: 'inner' }).execute()
          await sql`SELECT 1/0`.execute(trx).catch(() => {})
        })
        .then(
          () => undefined,
          (e: Error) => e,
        )
      expect(nested?.message ?? '').not.toMatch(/current transaction is aborted/)
      await db.insertInto('orders').values({ note: 'after' }).execute()
    })
    expect(await f.notes()).toEqual(['outer', 'after'])
  })
})
