/**
 * Mission probes (session 6c): the five failures the project exists to end, hit the way a user
 * of @scoped/pg or @scoped/kysely would plausibly hit them, against the real PostgreSQL. Each
 * asserts what the user reads (class, code, message naming what happened and the fix) and that
 * nothing leaks. `it.fails` = the user gets something else: the comment says what and what they
 * would need.
 */
import { createScope, type Scope, SessionClosedError } from '@scoped/core'
import { pgDriver, scopedPool } from '@scoped/pg'
import type { DatabaseConnection, Kysely, Transaction } from 'kysely'
import type pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type DB, type Fixture, fixture } from '../../packages/kysely/test/support.ts'
import { testDatabase } from '../support/db.ts'
import {
  committedRows,
  createTable,
  expectNoIdleInTransaction,
  expectPoolSettled,
  gate,
  type TestPool,
  testPool,
} from './support.ts'

describe('pg: (3) a connection kept past its request', () => {
  let url: string
  let t: TestPool
  let scope: Scope<pg.PoolClient>

  beforeAll(async () => {
    url = await testDatabase('mission_pg')
    await createTable(url, 'notes')
    t = testPool(url, 'mission_pg', { max: 1 })
    scope = createScope({ driver: pgDriver(t.pool), default: false, name: 'mission-pg' })
  })
  afterAll(async () => {
    await scope.close()
  })

  // `const client = await getSession().connection()` memoised at module level — the way one binds
  // `drizzle(client)` or a repository to "the" connection. The user needs the next use after the
  // request to fail (SessionClosedError naming 'POST /first'), as a memoised Session does. What
  // they get: the pg.PoolClient is the raw pooled client, idle in the pool; the INSERT succeeds in
  // autocommit and 'late' is committed, with no error and no warning.
  // Documented limit (packages/pg README, "A client kept past its session is not fenced").
  it.fails('a pg.PoolClient from session.connection() used after its scope: fails loudly, writes nothing', async () => {
    let cached: pg.PoolClient | undefined
    await scope.run(
      async () => {
        cached ??= await scope.getSession().connection()
        await cached.query("INSERT INTO notes (v) VALUES ('first')")
      },
      { name: 'POST /first' },
    )
    const late = await cached!.query("INSERT INTO notes (v) VALUES ('late')").catch((e) => e)
    expect(late).toBeInstanceOf(SessionClosedError)
    expect(await committedRows(url, "SELECT v FROM notes WHERE v = 'late'")).toEqual([])
    expectPoolSettled(t.pool)
  })

  // Worse: the cached client is the one the pool hands the next request (max: 1), so the late
  // statement runs inside that request's transaction. The user needs SessionClosedError; they get
  // no error (lateError undefined): the stale write joined POST /b's transaction and silently went
  // with its rollback (had b committed, it would have been committed as b's work).
  it.fails("a pg.PoolClient kept from one request, used while another request holds it: does not join the other's transaction", async () => {
    let cached: pg.PoolClient | undefined
    await scope.run(
      async () => {
        cached = await scope.getSession().connection()
        await cached.query('SELECT 1')
      },
      { name: 'GET /a' },
    )
    let lateError: unknown
    await scope
      .run(
        async () => {
          await scope
            .getSession()
            .use((c) => c.query("INSERT INTO notes (v) VALUES ('b, rolled back')"))
          lateError = await cached!
            .query("INSERT INTO notes (v) VALUES ('stale a, inside b')")
            .then(
              () => undefined,
              (e) => e,
            )
          throw new Error('b fails')
        },
        { name: 'POST /b' },
      )
      .catch(() => {})
    expect(lateError).toBeInstanceOf(SessionClosedError)
    expectPoolSettled(t.pool)
    await expectNoIdleInTransaction(url, t.app)
  })

  it('scopedPool().query taken off the object at module level still routes per request and fails after it', async () => {
    const { query } = scopedPool(scope)
    let late: Promise<unknown> | undefined
    await scope.run(
      async () => {
        await query("INSERT INTO notes (v) VALUES ('destructured')")
        late = new Promise((r) => setTimeout(r, 20)).then(() => query('SELECT 1'))
        late.catch(() => {})
      },
      { name: 'POST /destructured' },
    )
    const err = (await late!.catch((e) => e)) as SessionClosedError
    expect(err).toBeInstanceOf(SessionClosedError)
    expect(err.code).toBe('SESSION_CLOSED')
    expect(err.message).toContain("'POST /destructured'")
    expect(err.message).toContain('Fix:')
    expect(await committedRows(url, "SELECT v FROM notes WHERE v = 'destructured'")).toEqual([
      { v: 'destructured' },
    ])
    expectPoolSettled(t.pool)
  })

  // (1) habit from plain pg: `const c = await session.connection(); try { … } finally { c.release() }`.
  // The user needs an error at the release() (or at the scope's end) saying the session owns the
  // connection and releases it itself. What they got before session 6's fix: the request
  // resolved, the COMMIT was sent on a client already back in the pool, and the double release
  // was only logged. Now pgDriver's release() on a session's client throws a TypeError saying so.
  it('client.release() called by the user on the session connection: the request fails loudly', async () => {
    const outcome = await scope
      .run(
        async () => {
          const c = await scope.getSession().connection()
          await c.query("INSERT INTO notes (v) VALUES ('released by user')")
          c.release()
        },
        { name: 'POST /self-release' },
      )
      .then(
        () => 'resolved',
        (e) => e,
      )
    // The pool comes back whole and the next request works, whatever the outcome.
    await scope.run(async () => {
      await scope.getSession().use((c) => c.query('SELECT 1'))
    })
    expectPoolSettled(t.pool)
    await expectNoIdleInTransaction(url, t.app)
    expect(outcome).toBeInstanceOf(TypeError)
    expect((outcome as Error).message).toMatch(
      /gives its connection back itself.*Fix: remove the release\(\) call/,
    )
  })

  // The same habit with a second request waiting (pool of 1): the pool hands the released client to
  // POST /b while POST /a still owns it; a's end then COMMITs b's half-done transaction, and b's
  // later failure cannot undo its write. The user needs b's write rolled back with b (or a's
  // release() refused); they got b's row committed although b threw. Fixed in session 6: a's
  // release() is refused (TypeError), a rolls back, and b's failure undoes its own write.
  it("client.release() by the user, another request gets the client: the other's failed work is not committed", async () => {
    const aDone = gate()
    const bWrote = gate()
    const a = scope.run(
      async () => {
        const c = await scope.getSession().connection()
        await c.query("INSERT INTO notes (v) VALUES ('a self-release')")
        c.release()
        await bWrote.promise
      },
      { name: 'POST /a' },
    )
    const b = scope.run(
      async () => {
        await scope.getSession().use((c) => c.query("INSERT INTO notes (v) VALUES ('b failed')"))
        bWrote.open()
        await aDone.promise
        throw new Error('b fails after its write')
      },
      { name: 'POST /b' },
    )
    const aOutcome = await a.then(
      () => 'resolved',
      (e) => e,
    )
    aDone.open()
    await b.catch(() => {})
    const rows = await committedRows(url, "SELECT v FROM notes WHERE v = 'b failed'")
    expectPoolSettled(t.pool)
    await expectNoIdleInTransaction(url, t.app)
    expect({ aOutcome: String(aOutcome), rows }).toEqual({
      aOutcome: expect.stringMatching(/Error/),
      rows: [],
    })
  })
})

describe('kysely: (3) objects kept past their request or transaction', () => {
  let f: Fixture
  beforeAll(async () => {
    f = await fixture('mission_kysely', { max: 1 })
  })
  afterAll(async () => {
    await f.close()
  })

  // `trx` saved from db.transaction().execute() (a repository constructed with it, kept in a cache)
  // and used by a later request. The user needs SessionClosedError naming the first request and
  // the fix. What they get is Kysely's own `Error: Transaction is already committed`: loud, and
  // nothing is written, but it names neither the request that made trx nor the fix (no code).
  it.fails('a trx from db.transaction() used in a later request: fails loudly, names the first request', async () => {
    let saved: Transaction<DB> | undefined
    await f.scope.run(
      async () => {
        await f.db.transaction().execute(async (trx) => {
          saved = trx
          await trx.insertInto('orders').values({ note: 'in trx' }).execute()
        })
      },
      { name: 'POST /trx' },
    )
    let late: unknown
    await f.scope.run(
      async () => {
        late = await saved!
          .insertInto('orders')
          .values({ note: 'stale trx' })
          .execute()
          .catch((e) => e)
      },
      { name: 'POST /next' },
    )
    expect(late).toBeInstanceOf(SessionClosedError)
    expect((late as SessionClosedError).code).toBe('SESSION_CLOSED')
    expect((late as Error).message).toContain("'POST /trx'")
    expect((late as Error).message).toContain('Fix:')
    expect(await f.notes()).toEqual(['in trx'])
    expect(await f.idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  })

  it('a trx used after its db.transaction() committed, in the same request: fails loudly', async () => {
    let saved: Transaction<DB> | undefined
    let late: unknown
    await f.scope
      .run(
        async () => {
          await f.db.transaction().execute(async (trx) => {
            saved = trx
            await trx.insertInto('orders').values({ note: 'trx 2' }).execute()
          })
          late = await saved!
            .insertInto('orders')
            .values({ note: 'after trx committed' })
            .execute()
            .catch((e) => e)
        },
        { name: 'POST /trx-after' },
      )
      .catch(() => {})
    expect(late).toBeInstanceOf(Error)
    expect(String(late)).toMatch(/transaction|closed|committed/i)
    expect(await f.idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  })

  it('a connection from db.connection().execute() kept and used in a later request: fails loudly', async () => {
    let kept: Kysely<DB> | undefined
    await f.scope.run(
      async () => {
        await f.db.connection().execute(async (conn) => {
          kept = conn
          await conn.selectNoFrom((eb) => eb.val(1).as('one')).execute()
        })
      },
      { name: 'GET /conn' },
    )
    let late: unknown
    await f.scope.run(
      async () => {
        late = await kept!
          .insertInto('orders')
          .values({ note: 'stale conn' })
          .execute()
          .catch((e) => e)
      },
      { name: 'GET /next' },
    )
    expect(late).toBeInstanceOf(SessionClosedError)
    expect((late as Error).message).toContain("'GET /conn'")
    expect(await f.notes()).not.toContain('stale conn')
    expect(await f.idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  })

  // The Kysely twin of the pg probe above: the DatabaseConnection the session hands out is the
  // pooled one; kept past the scope, its INSERT runs in autocommit and is committed
  // ({ numAffectedRows: 1n }), no error. The user needs SessionClosedError naming 'GET /raw'.
  it.fails('a raw DatabaseConnection from session.connection() kept at module level: fails loudly after', async () => {
    let kept: DatabaseConnection | undefined
    await f.scope.run(
      async () => {
        kept = await f.scope.getSession().connection()
      },
      { name: 'GET /raw' },
    )
    const { CompiledQuery } = await import('kysely')
    const late = await kept!
      .executeQuery(CompiledQuery.raw("INSERT INTO orders (note) VALUES ('stale raw')"))
      .catch((e) => e)
    expect(late).toBeInstanceOf(SessionClosedError)
    expect(await f.notes()).not.toContain('stale raw')
    expect(await f.idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  })
})
