/**
 * Session 5 review probes of @scoped/kysely against a real PostgreSQL:
 * db.transaction() / db.startTransaction() as savepoints under Promise.all
 * with plain queries, db.connection().execute(), a stream cut off by a job
 * timeout, and 20 concurrent statements in one session (one failing) on a
 * plain pool and on a `pipeline: true` pool.
 */
import { createScope, ScopeAbortedError, TransactionStateError } from '@scoped/core'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import { PostgresDialect, sql } from 'kysely'
import pg from 'pg'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { backends, independentQuery } from '../../../test/support/db.ts'
import { ChunkedCursor, type DB, type Fixture, fixture } from './support.ts'

let f: Fixture

beforeAll(async () => {
  f = await fixture('kysely_review_s5', {
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

const pid = sql<number>`pg_backend_pid()`.as('pid')

describe('savepoints under Promise.all with plain queries', () => {
  it('db.transaction() that throws, between two plain inserts issued with it: only its own row is undone, the unit commits the rest', async () => {
    const { db, scope } = f
    const settled = await scope.run(async () => {
      const r = await Promise.allSettled([
        db.insertInto('orders').values({ note: 'a' }).execute(),
        db.transaction().execute(async (trx) => {
          await trx.insertInto('orders').values({ note: 'b' }).execute()
          throw new Error('inner failed')
        }),
        db.insertInto('orders').values({ note: 'c' }).execute(),
      ])
      return r.map((x) => x.status)
    })
    expect(settled).toEqual(['fulfilled', 'rejected', 'fulfilled'])
    expect((await f.notes()).sort()).toEqual(['a', 'c'])
  })

  // Documented limit (README, Limits), kept failing on purpose: two db.transaction() calls
  // started at once in one session, where the second ends first: on the wire the second's
  // SAVEPOINT is nested inside the first's, and when the first then throws, its ROLLBACK TO
  // SAVEPOINT undoes the second's insert after the second resolved. The core refuses a
  // transaction(fn) started beside a running one (it tells inside from beside through
  // AsyncLocalStorage: core/test/concurrent-transactions.test.ts, and Drizzle's), but Kysely
  // begins and ends a transaction in two calls outside its callback, so its transactions are
  // opened with transactionAround(), where inside and beside look the same.
  it.fails('two db.transaction() calls at once, the second ending first, then the first throwing: the second is not silently undone', async () => {
    const { db, scope } = f
    const r = await scope
      .run(async () => {
        await db.insertInto('orders').values({ note: 'first' }).execute()
        return Promise.allSettled([
          db.transaction().execute(async (trx) => {
            await trx.insertInto('orders').values({ note: 't1' }).execute()
            await sql`SELECT pg_sleep(0.05)`.execute(trx)
            throw new Error('t1 failed')
          }),
          db.transaction().execute(async (trx) => {
            await trx.insertInto('orders').values({ note: 't2' }).execute()
          }),
        ])
      })
      .then(
        (settled) => settled.map((x) => x.status),
        (e: unknown) => e,
      )
    const notes = await f.notes()
    if (Array.isArray(r) && r[1] === 'fulfilled') {
      // t2 resolved and the unit committed: t2's row must be in it.
      expect(notes).toContain('t2')
    } else {
      // The overlap was refused: nothing of the unit commits (README).
      expect(notes).toEqual([])
    }
  })

  it('db.startTransaction() rolled back while plain queries run beside it: its rows undone, the unit commits what ran before it', async () => {
    const { db, scope } = f
    await scope.run(async () => {
      await db.insertInto('orders').values({ note: 'before' }).execute()
      const trx = await db.startTransaction().execute()
      await Promise.all([
        trx.insertInto('orders').values({ note: 'in trx' }).execute(),
        trx.insertInto('orders').values({ note: 'in trx 2' }).execute(),
      ])
      await trx.rollback().execute()
      await Promise.all([
        db.insertInto('orders').values({ note: 'after 1' }).execute(),
        db.insertInto('orders').values({ note: 'after 2' }).execute(),
      ])
    })
    expect(await f.notes()).toEqual(['before', 'after 1', 'after 2'])
  })

  it('db.startTransaction() never ended while the handler returns: the scope end does not hang forever (maxHoldMs takes it), nothing commits', async () => {
    const pool = new pg.Pool({ connectionString: f.url, application_name: `${f.app}_st`, max: 1 })
    const dialect = new PostgresDialect({ pool })
    const scope = createScope({
      driver: kyselyDriver(dialect, { pool }),
      name: 'st',
      default: false,
      maxHoldMs: 300,
      leakDetectionMs: 0,
      onError: () => {},
    })
    const db = scopedKysely<DB>(scope)
    try {
      const r = await scope
        .run(async () => {
          await db.insertInto('orders').values({ note: 'unit' }).execute()
          const trx = await db.startTransaction().execute()
          await trx.insertInto('orders').values({ note: 'forgotten' }).execute()
        })
        .catch((e: unknown) => e)
      expect(r).toBeInstanceOf(Error)
      expect((r as Error).message).toMatch(/maxHoldMs/)
      expect(await f.notes()).toEqual([])
      expect(pool.totalCount).toBe(pool.idleCount)
    } finally {
      await scope.close({ timeoutMs: 500 })
    }
  })
})

describe('db.connection().execute()', () => {
  it('runs on the session backend, in its unit of work, concurrently with plain db queries', async () => {
    const { db, scope } = f
    const out = await scope.run(async () => {
      const [inside, outside] = await Promise.all([
        db.connection().execute(async (conn) => {
          await conn.insertInto('orders').values({ note: 'conn' }).execute()
          return conn.selectNoFrom([pid]).executeTakeFirstOrThrow()
        }),
        db.selectNoFrom([pid]).executeTakeFirstOrThrow(),
      ])
      await db.insertInto('orders').values({ note: 'plain' }).execute()
      return { same: inside.pid === outside.pid }
    })
    expect(out.same).toBe(true)
    expect((await f.notes()).sort()).toEqual(['conn', 'plain'])
  })

  it('a throw inside it rolls the whole unit back (it is not a transaction of its own)', async () => {
    const { db, scope } = f
    const r = await scope
      .run(async () => {
        await db.insertInto('orders').values({ note: 'unit' }).execute()
        await db.connection().execute(async (conn) => {
          await conn.insertInto('orders').values({ note: 'conn' }).execute()
          throw new Error('conn failed')
        })
      })
      .catch((e: Error) => e.message)
    expect(r).toBe('conn failed')
    expect(await f.notes()).toEqual([])
  })
})

describe('a stream cut off', () => {
  it('by a job timeout while the query runs: ScopeAbortedError (timeout), the statement cancelled, nothing committed, the connection back', async () => {
    const { db, scope } = f
    const started = Date.now()
    const r = await scope
      .runJob(
        async () => {
          await db.insertInto('orders').values({ note: 'before' }).execute()
          let n = 0
          for await (const _ of db
            .selectNoFrom([sql<number>`g`.as('g'), sql`pg_sleep(0.01)`.as('s')])
            .modifyEnd(sql`FROM generate_series(1, 300) g`)
            .stream(10)) {
            n++
          }
          return n
        },
        { timeoutMs: 150, name: 'stream' },
      )
      .catch((e: unknown) => e)
    expect(Date.now() - started).toBeLessThan(2500) // cancelled, not the 3 s of the query
    expect(r).toBeInstanceOf(ScopeAbortedError)
    expect((r as ScopeAbortedError).kind).toBe('timeout')
    expect(await f.notes()).toEqual([])
  })

  it('by a signal aborted in the loop body: the job rejects, nothing committed, the connection back', async () => {
    const { db, scope } = f
    const ac = new AbortController()
    let seen = 0
    const r = await scope
      .runJob(
        async () => {
          await db.insertInto('orders').values({ note: 'before' }).execute()
          for await (const _ of db.selectFrom('items').select('n').stream(5)) {
            if (++seen === 7) ac.abort()
            if (scope.getSession().signal.aborted) break
          }
          await db.insertInto('orders').values({ note: 'after' }).execute()
        },
        { signal: ac.signal },
      )
      .catch((e: unknown) => e)
    expect(seen).toBe(7)
    expect(r).toBeInstanceOf(ScopeAbortedError)
    expect(await f.notes()).toEqual([])
  })
})

describe('20 statements at once in one session, the 8th failing', () => {
  for (const pipeline of [false, true]) {
    it(`${pipeline ? 'pipeline: true pool' : 'plain pool'}: the first 7 run, the 8th reports its own error, the unit commits nothing`, async () => {
      const app = `${f.app}_p${pipeline ? 1 : 0}`
      const pool = new pg.Pool({
        connectionString: f.url,
        application_name: app,
        max: 2,
        ...(pipeline && { pipeline: true }),
      } as pg.PoolConfig)
      const dialect = new PostgresDialect({ pool })
      const scope = createScope({
        driver: kyselyDriver(dialect, { pool }),
        name: `p${pipeline}`,
        default: false,
        leakDetectionMs: 0,
        onError: () => {},
      })
      const db = scopedKysely<DB>(scope)
      try {
        let settled: PromiseSettledResult<unknown>[] = []
        const r = await scope
          .run(async () => {
            settled = await Promise.allSettled(
              Array.from({ length: 20 }, (_, i) =>
                i === 7
                  ? sql`INSERT INTO orders (note) VALUES ((1 / 0)::text)`.execute(db)
                  : db
                      .insertInto('orders')
                      .values({ note: `n${i}` })
                      .returning('note')
                      .executeTakeFirstOrThrow(),
              ),
            )
            // The handler caught every error: the unit must still not commit (README).
          })
          .catch((e: unknown) => e)
        const status = settled.map((s) => s.status)
        expect(status.slice(0, 7)).toEqual(Array(7).fill('fulfilled'))
        expect(status[7]).toBe('rejected')
        expect(String((settled[7] as PromiseRejectedResult).reason.message)).not.toMatch(
          /current transaction is aborted/,
        )
        // Those after it fail, with the server's "aborted" error: not run.
        expect(status.slice(8)).toEqual(Array(12).fill('rejected'))
        expect(r).toBeInstanceOf(TransactionStateError)
        expect(await f.notes()).toEqual([])
        expect(pool.totalCount).toBe(pool.idleCount)
        expect(
          (await backends(f.url, app)).filter((b) => b.state === 'idle in transaction'),
        ).toEqual([])
      } finally {
        await scope.close({ timeoutMs: 500 })
      }
    })
  }
})
