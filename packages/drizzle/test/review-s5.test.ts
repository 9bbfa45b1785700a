/**
 * Session 5 review probes of @scoped/drizzle against a real PostgreSQL:
 * relational queries (`db.query.x.findMany({ with })`) under Promise.all in
 * one session, and db.transaction() nested twice with the inner one calling
 * tx.rollback().
 */
import { createScope } from '@scoped/core'
import { scopedDrizzle } from '@scoped/drizzle'
import { pgDriver } from '@scoped/pg'
import { relations, sql, TransactionRollbackError } from 'drizzle-orm'
import { integer, pgTable, serial, text } from 'drizzle-orm/pg-core'
import pg from 'pg'
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import {
  committedRows,
  expectNoIdleInTransaction,
  expectPoolSettled,
  uniqueAppName,
} from '../../../test/foundation/support.ts'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'

const authors = pgTable('authors', { id: serial('id').primaryKey(), name: text('name').notNull() })
const posts = pgTable('posts', {
  id: serial('id').primaryKey(),
  authorId: integer('author_id').notNull(),
  title: text('title').notNull(),
})
const authorsRelations = relations(authors, ({ many }) => ({ posts: many(posts) }))
const postsRelations = relations(posts, ({ one }) => ({
  author: one(authors, { fields: [posts.authorId], references: [authors.id] }),
}))
const schema = { authors, posts, authorsRelations, postsRelations }

let url: string
let app: string
let pool: pg.Pool
let scope: ReturnType<typeof createScope<pg.PoolClient>>
let db: ReturnType<typeof scopedDrizzle<typeof schema>>

beforeAll(async () => {
  url = await testDatabase('drizzle_review_s5')
  await independentQuery(
    url,
    `CREATE TABLE authors (id serial PRIMARY KEY, name text NOT NULL);
     CREATE TABLE posts (id serial PRIMARY KEY, author_id int NOT NULL, title text NOT NULL);`,
  )
  app = uniqueAppName('drizzle-s5')
  pool = new pg.Pool({ connectionString: url, max: 2, application_name: app })
  scope = createScope({ driver: pgDriver(pool), default: false, name: 'drizzle-s5' })
  db = scopedDrizzle(scope, { schema })
})

beforeEach(async () => {
  await independentQuery(
    url,
    `TRUNCATE authors, posts RESTART IDENTITY;
     INSERT INTO authors (name) VALUES ('ann'), ('bob'), ('cy');
     INSERT INTO posts (author_id, title) VALUES (1, 'a1'), (1, 'a2'), (2, 'b1');`,
  )
})

afterEach(async () => {
  expectPoolSettled(pool)
  expect(scope.stats()).toMatchObject({ open: 0, holding: 0, waiting: 0 })
  await expectNoIdleInTransaction(url, app)
})

afterAll(async () => {
  await scope.close()
})

const titles = async () =>
  (await committedRows<{ title: string }>(url, 'SELECT title FROM posts ORDER BY id')).map(
    (r) => r.title,
  )

describe('relational queries under Promise.all in one session', () => {
  it('ten findMany({ with }) at once, with writes between: every result right, one backend, one checkout, one transaction', async () => {
    const before = scope.stats().totals.acquired
    const out = await scope.run(async () =>
      Promise.all([
        ...Array.from({ length: 5 }, () =>
          db.query.authors.findMany({
            with: { posts: { orderBy: (p, { asc }) => [asc(p.id)] } },
            orderBy: (a, { asc }) => [asc(a.id)],
          }),
        ),
        db.insert(posts).values({ authorId: 3, title: 'c1' }).returning(),
        ...Array.from({ length: 5 }, () =>
          db.query.posts.findMany({
            with: { author: true },
            orderBy: (p, { asc }) => [asc(p.id)],
          }),
        ),
        db.execute(sql`SELECT pg_backend_pid() AS pid, txid_current() AS xid`),
        db.execute(sql`SELECT pg_backend_pid() AS pid, txid_current() AS xid`),
      ]),
    )
    const firstAuthors = out.slice(0, 5)
    for (const a of firstAuthors) {
      expect(a).toEqual([
        {
          id: 1,
          name: 'ann',
          posts: [
            { id: 1, authorId: 1, title: 'a1' },
            { id: 2, authorId: 1, title: 'a2' },
          ],
        },
        { id: 2, name: 'bob', posts: [{ id: 3, authorId: 2, title: 'b1' }] },
        { id: 3, name: 'cy', posts: [] },
      ])
    }
    // The posts queries were issued after the insert: in call order, they see it.
    for (const p of out.slice(6, 11) as { title: string; author: { name: string } }[][]) {
      expect(p.map((x) => `${x.title}:${x.author.name}`)).toEqual([
        'a1:ann',
        'a2:ann',
        'b1:bob',
        'c1:cy',
      ])
    }
    const [x, y] = out.slice(11) as unknown as { rows: { pid: number; xid: string }[] }[]
    expect(x!.rows[0]).toEqual(y!.rows[0])
    expect(scope.stats().totals.acquired - before).toBe(1)
    expect(await titles()).toEqual(['a1', 'a2', 'b1', 'c1'])
  })

  it('one findMany failing among them (the unit is aborted): the handler sees each outcome; nothing commits', async () => {
    const r = await scope
      .run(async () => {
        const settled = await Promise.allSettled([
          db.insert(posts).values({ authorId: 3, title: 'c1' }),
          db.query.authors.findMany({ with: { posts: true } }),
          db.execute(sql`SELECT 1 / 0`),
          db.query.posts.findMany({ with: { author: true } }),
        ])
        return settled.map((s) => s.status)
      })
      .catch((e: unknown) => e)
    // The caught error aborted the transaction: the COMMIT must not be a silent success.
    expect(r).toBeInstanceOf(Error)
    expect(await titles()).toEqual(['a1', 'a2', 'b1'])
  })
})

describe('db.transaction() nested twice, the inner one calling tx.rollback()', () => {
  it('caught by the middle: only the inner rows are undone; outer and middle commit with the unit', async () => {
    let caught: unknown
    await scope.run(async () => {
      await db.insert(posts).values({ authorId: 1, title: 'unit' })
      await db.transaction(async (outer) => {
        await outer.insert(posts).values({ authorId: 1, title: 'outer' })
        await outer.transaction(async (middle) => {
          await middle.insert(posts).values({ authorId: 1, title: 'middle' })
          caught = await middle
            .transaction(async (inner) => {
              await inner.insert(posts).values({ authorId: 1, title: 'inner' })
              inner.rollback()
            })
            .catch((e: unknown) => e)
          await middle.insert(posts).values({ authorId: 1, title: 'middle after' })
        })
      })
    })
    expect(caught).toBeInstanceOf(TransactionRollbackError)
    expect(await titles()).toEqual(['a1', 'a2', 'b1', 'unit', 'outer', 'middle', 'middle after'])
  })

  it('not caught: it unwinds the middle and the outer savepoints; the handler catches it at the top and the unit commits the rest', async () => {
    let caught: unknown
    await scope.run(async () => {
      await db.insert(posts).values({ authorId: 1, title: 'unit' })
      caught = await db
        .transaction(async (outer) => {
          await outer.insert(posts).values({ authorId: 1, title: 'outer' })
          await outer.transaction(async (middle) => {
            await middle.insert(posts).values({ authorId: 1, title: 'middle' })
            await middle.transaction(async (inner) => {
              await inner.insert(posts).values({ authorId: 1, title: 'inner' })
              inner.rollback()
            })
          })
        })
        .catch((e: unknown) => e)
      await db.insert(posts).values({ authorId: 1, title: 'unit after' })
    })
    expect(caught).toBeInstanceOf(TransactionRollbackError)
    expect(await titles()).toEqual(['a1', 'a2', 'b1', 'unit', 'unit after'])
  })

  it("as the scope's first statement (a real BEGIN): rollback() in the innermost, caught by the outer — the outer still COMMITs its own rows", async () => {
    let caught: unknown
    await scope
      .run(async () => {
        await db.transaction(async (outer) => {
          await outer.insert(posts).values({ authorId: 2, title: 'outer' })
          await outer.transaction(async (middle) => {
            await middle.insert(posts).values({ authorId: 2, title: 'middle' })
            caught = await middle
              .transaction(async (inner) => {
                await inner.insert(posts).values({ authorId: 2, title: 'inner' })
                await inner.query.authors.findMany({ with: { posts: true } })
                inner.rollback()
              })
              .catch((e: unknown) => e)
          })
        })
        // The handler then throws: the outermost transaction committed already (README).
        throw new Error('handler failed after')
      })
      .catch(() => {})
    expect(caught).toBeInstanceOf(TransactionRollbackError)
    expect(await titles()).toEqual(['a1', 'a2', 'b1', 'outer', 'middle'])
  })

  it('rollback() in the outermost db.transaction (a real BEGIN): it rejects with TransactionRollbackError and nothing of it commits', async () => {
    const r = await scope.run(async () => {
      const e = await db
        .transaction(async (tx) => {
          await tx.insert(posts).values({ authorId: 3, title: 'gone' })
          tx.rollback()
        })
        .catch((x: unknown) => x)
      await db.insert(posts).values({ authorId: 3, title: 'kept' })
      return e
    })
    expect(r).toBeInstanceOf(TransactionRollbackError)
    expect(await titles()).toEqual(['a1', 'a2', 'b1', 'kept'])
  })
})

describe('two db.transaction() calls at once in one session', () => {
  // Before the core told inside from beside: the second became a savepoint inside the first,
  // resolved, and the first's later rollback undid its row without a word.
  it('the one started beside the other is refused before it runs; the first rolls back alone; the unit commits the rest', async () => {
    const settled = await scope.run(async () => {
      await db.insert(posts).values({ authorId: 1, title: 'unit' })
      return Promise.allSettled([
        db.transaction(async (tx) => {
          await tx.insert(posts).values({ authorId: 1, title: 't1' })
          await tx.execute(sql`SELECT pg_sleep(0.05)`)
          throw new Error('t1 failed')
        }),
        db.transaction(async (tx) => {
          await tx.insert(posts).values({ authorId: 2, title: 't2' })
        }),
      ])
    })
    expect(settled[0]).toMatchObject({ status: 'rejected', reason: { message: 't1 failed' } })
    expect(settled[1]).toMatchObject({ status: 'rejected' })
    expect(String((settled[1] as PromiseRejectedResult).reason)).toMatch(
      /TransactionStateError.*called while another transaction\(fn\) of the session is running/,
    )
    expect(await titles()).toEqual(['a1', 'a2', 'b1', 'unit'])
  })
})
