/**
 * Review probes (session 6, round d) of scopedKysely against a real PostgreSQL:
 * db.transaction() whose callback throws a non-Error, db.connection() with a
 * transaction inside it, sql.raw / executeQuery outside a scope under both
 * outsideScope settings, a real pg-cursor stream abandoned midway, Kysely
 * plugins (CamelCasePlugin, withPlugin, withSchema) on the scoped instance and
 * derived instances used across scopes. A passing probe is a regression test.
 */
import { createRequire } from 'node:module'
import { createScope, NoActiveScopeError } from '@scoped/core'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import {
  CamelCasePlugin,
  CompiledQuery,
  type Generated,
  type Kysely,
  PostgresDialect,
  sql,
} from 'kysely'
import pg from 'pg'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { backends, independentQuery } from '../../../test/support/db.ts'
import { type DB, type Fixture, fixture } from './support.ts'

let f: Fixture

beforeAll(async () => {
  // A real cursor (pg-cursor, a dependency of the examples only): a break must close its portal.
  const Cursor: unknown = createRequire(import.meta.url)(
    '../../../examples/shared/node_modules/pg-cursor',
  )
  f = await fixture('kysely_review_s6d', {
    max: 3,
    dialect: (pool) => new PostgresDialect({ pool, cursor: Cursor as never }),
  })
})

afterEach(async () => {
  expect(await f.idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  expect(f.scope.stats()).toMatchObject({ open: 0, holding: 0, waiting: 0 })
  await independentQuery(f.url, 'TRUNCATE orders')
  await independentQuery(f.url, 'TRUNCATE archive.orders')
})

afterAll(async () => {
  await f.close()
})

describe('db.transaction().execute(fn) whose fn throws a non-Error', () => {
  // README (Semantics): "a throw in `fn` rolls back to it — only `fn`'s writes are undone — and
  // rethrows; the unit of work goes on."
  for (const [label, value] of [
    ['a string', 'nope'],
    ['undefined', undefined],
    ['a plain object', { code: 'X1' }],
  ] as const) {
    it(`${label}: the same value is rethrown, only fn's rows are undone, the unit commits the rest`, async () => {
      const { db, scope } = f
      const caught = await scope.run(async () => {
        await db.insertInto('orders').values({ note: 'before' }).execute()
        let seen: { value: unknown } | undefined
        try {
          await db.transaction().execute(async (trx) => {
            await trx.insertInto('orders').values({ note: 'inside' }).execute()
            throw value
          })
        } catch (e) {
          seen = { value: e }
        }
        await db.insertInto('orders').values({ note: 'after' }).execute()
        return seen
      })
      expect(caught).toBeDefined()
      expect(caught!.value).toBe(value)
      expect(await f.notes()).toEqual(['before', 'after'])
    })
  }

  it('as the outermost transaction (first statement of the scope): the value is rethrown, nothing of fn is kept', async () => {
    const { db, scope } = f
    const outcome = await scope
      .run(async () => {
        await db.transaction().execute(async (trx) => {
          await trx.insertInto('orders').values({ note: 'outer-inside' }).execute()
          throw 'plain string'
        })
      })
      .then(
        () => ({ ok: true as const }),
        (e: unknown) => ({ ok: false as const, e }),
      )
    expect(outcome).toEqual({ ok: false, e: 'plain string' })
    expect(await f.notes()).toEqual([])
  })
})

describe('db.connection().execute(fn) inside a scope', () => {
  it('a transaction opened on the connection is a savepoint of the unit: its throw undoes only its rows; one backend throughout', async () => {
    const { db, scope } = f
    await scope.run(async () => {
      await db.insertInto('orders').values({ note: 'c-before' }).execute()
      await db.connection().execute(async (conn) => {
        await conn.insertInto('orders').values({ note: 'c-conn' }).execute()
        await conn
          .transaction()
          .execute(async (trx) => {
            await trx.insertInto('orders').values({ note: 'c-savepoint' }).execute()
            throw new Error('undo the savepoint')
          })
          .catch(() => {})
        await conn.transaction().execute(async (trx) => {
          await trx.insertInto('orders').values({ note: 'c-kept' }).execute()
        })
      })
    })
    expect(await f.notes()).toEqual(['c-before', 'c-conn', 'c-kept'])
    const pids = await independentQuery(f.url, 'SELECT DISTINCT pid, xid FROM orders')
    expect(pids).toHaveLength(1)
  })
})

describe('raw SQL outside any scope', () => {
  // README (outsideScope): "'throw' raises NoActiveScopeError; 'pool' runs on a pooled connection
  // as plain Kysely would (autocommit; transaction() is a real BEGIN/COMMIT)".
  it("'throw': sql.raw().execute(db) and db.executeQuery() both reject with NoActiveScopeError, nothing is checked out", async () => {
    const { db } = f
    await expect(sql.raw('SELECT 1').execute(db)).rejects.toBeInstanceOf(NoActiveScopeError)
    await expect(db.executeQuery(CompiledQuery.raw('SELECT 1'))).rejects.toBeInstanceOf(
      NoActiveScopeError,
    )
    expect(f.pool.totalCount - f.pool.idleCount).toBe(0)
  })

  it("'pool': sql.raw() and executeQuery() autocommit on a pooled connection that goes back at once; a failing one too", async () => {
    const pooled = scopedKysely<DB>(f.scope, { dialect: f.dialect, outsideScope: 'pool' })
    await sql.raw("INSERT INTO orders (note) VALUES ('raw-1')").execute(pooled)
    await pooled.executeQuery(CompiledQuery.raw("INSERT INTO orders (note) VALUES ('raw-2')"))
    await expect(pooled.executeQuery(CompiledQuery.raw('SELECT 1/0'))).rejects.toMatchObject({
      code: '22012',
    })
    // Autocommit: a failing statement does not take the earlier ones with it.
    expect(await f.notes()).toEqual(['raw-1', 'raw-2'])
    const { rows } = await sql<{
      in_tx: boolean
    }>`SELECT now() <> statement_timestamp() AS in_tx`.execute(pooled)
    expect(rows[0]!.in_tx).toBe(false)
  })
})

describe('a real pg-cursor stream left midway', () => {
  // README (Semantics): ".stream() ... holds the connection from the first row until the stream
  // ends (finished, `break`, or error): the session is not committed or released before."
  it('break after 3 of a million rows: the cursor is closed, no statement left running, the next statement runs, the unit commits, one connection', async () => {
    const { db, scope } = f
    const seen = await scope.run(async () => {
      let n = 0
      for await (const _row of db
        .selectNoFrom(sql<number>`generate_series(1, 1000000)`.as('n'))
        .stream(2)) {
        if (++n === 3) break
      }
      const pid = (await sql<{ pid: number }>`SELECT pg_backend_pid() AS pid`.execute(db)).rows[0]!
        .pid
      const mine = (await backends(f.url, f.app)).filter(
        (b) => (b as unknown as { pid: number }).pid === pid,
      )
      const portals = (
        await sql<{ c: string }>`SELECT count(*)::text AS c FROM pg_cursors`.execute(db)
      ).rows[0]!.c
      await db.insertInto('orders').values({ note: 'after-break' }).execute()
      return { n, mine: mine.map((b) => b.state), portals }
    })
    expect(seen.n).toBe(3)
    // Between statements the backend is idle in its transaction (the cursor's query is not still
    // running), and no open portal is left behind.
    expect(seen.mine).toEqual(['idle in transaction'])
    expect(seen.portals).toBe('0')
    expect(await f.notes()).toEqual(['after-break'])
  })

  it('an iterator abandoned after its first row with return(): the scope ends, commits, the connection goes back', async () => {
    const { db, scope } = f
    await scope.run(async () => {
      const it = db
        .selectNoFrom(sql<number>`generate_series(1, 100000)`.as('n'))
        .stream(10)
        [Symbol.asyncIterator]()
      const first = await it.next()
      expect(first.done).toBe(false)
      await it.return?.()
      await db.insertInto('orders').values({ note: 'after-return' }).execute()
    })
    expect(await f.notes()).toEqual(['after-return'])
  })

  it('a loop body that throws after 2 rows of a cursor: the scope rejects with it, nothing commits', async () => {
    const { db, scope } = f
    const boom = new Error('loop body failed')
    await expect(
      scope.run(async () => {
        await db.insertInto('orders').values({ note: 'lost' }).execute()
        let n = 0
        for await (const _row of db
          .selectNoFrom(sql<number>`generate_series(1, 100000)`.as('n'))
          .stream(1)) {
          if (++n === 2) throw boom
        }
      }),
    ).rejects.toBe(boom)
    expect(await f.notes()).toEqual([])
  })
})

describe('Kysely plugins and derived instances', () => {
  interface CamelDB {
    orders: { id: Generated<number>; note: string; createdBy: string | null }
  }

  it('CamelCasePlugin given to scopedKysely: camelCase in, snake_case on the wire, camelCase out; in the unit of work', async () => {
    await independentQuery(f.url, 'ALTER TABLE orders ADD COLUMN IF NOT EXISTS created_by text')
    try {
      const camel = scopedKysely<CamelDB>(f.scope, {
        dialect: f.dialect,
        plugins: [new CamelCasePlugin()],
      })
      const row = await f.scope.run(async () => {
        await camel.insertInto('orders').values({ note: 'camel', createdBy: 'alice' }).execute()
        return camel.selectFrom('orders').select(['note', 'createdBy']).executeTakeFirstOrThrow()
      })
      expect(row).toEqual({ note: 'camel', createdBy: 'alice' })
      const raw = await independentQuery(f.url, 'SELECT created_by FROM orders')
      expect(raw).toEqual([{ created_by: 'alice' }])
      // The plugin is the instance's: the global db is unchanged.
      const plain = await f.scope.run(() =>
        sql<{ created_by: string }>`SELECT created_by FROM orders`.execute(f.db),
      )
      expect(plain.rows).toEqual([{ created_by: 'alice' }])
    } finally {
      await independentQuery(f.url, 'ALTER TABLE orders DROP COLUMN created_by')
    }
  })

  it('db.withSchema() and db.withPlugin() made once at module level, used by two concurrent scopes: each scope its own session and transaction', async () => {
    const archive = f.db.withSchema('archive')
    const camel = (f.db as unknown as Kysely<CamelDB>).withPlugin(new CamelCasePlugin())
    const gates: Array<() => void> = []
    const both = ['a', 'b'].map((tag) =>
      f.scope.run(async () => {
        await archive
          .insertInto('orders')
          .values({ note: `arch-${tag}` })
          .execute()
        await new Promise<void>((r) => gates.push(r))
        await camel
          .insertInto('orders')
          .values({ note: `main-${tag}` })
          .execute()
        if (tag === 'b') throw new Error('b rolls back')
      }),
    )
    while (gates.length < 2) await new Promise((r) => setTimeout(r, 5))
    for (const g of gates) g()
    const results = await Promise.allSettled(both)
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'rejected'])
    expect(await f.notes('archive.orders')).toEqual(['arch-a'])
    expect(await f.notes()).toEqual(['main-a'])
    const xids = await independentQuery(
      f.url,
      'SELECT (SELECT xid FROM archive.orders) = (SELECT xid FROM orders) AS same',
    )
    expect(xids).toEqual([{ same: true }])
  })

  it('a derived instance outside any scope throws NoActiveScopeError like the global db', async () => {
    await expect(
      f.db.withSchema('archive').selectFrom('orders').selectAll().execute(),
    ).rejects.toBeInstanceOf(NoActiveScopeError)
  })
})

describe('a stream iterator dropped without return()', () => {
  // README (Semantics): ".stream() ... holds the connection from the first row until the stream
  // ends (finished, `break`, or error)"; (Limits, the same shape for startTransaction()): "the
  // scope's end waits for it (leak detection warns after leakDetectionMs; maxHoldMs takes the
  // connection)".
  it('the scope end does not hang forever: maxHoldMs takes the connection, nothing commits, the pool is idle', async () => {
    const Cursor: unknown = createRequire(import.meta.url)(
      '../../../examples/shared/node_modules/pg-cursor',
    )
    const pool = new pg.Pool({ connectionString: f.url, application_name: `${f.app}_dr`, max: 1 })
    const dialect = new PostgresDialect({ pool, cursor: Cursor as never })
    const scope = createScope({
      driver: kyselyDriver(dialect, { pool }),
      name: 'dropped',
      default: false,
      maxHoldMs: 300,
      leakDetectionMs: 0,
      onError: () => {},
    })
    const db = scopedKysely<DB>(scope)
    try {
      const r = await Promise.race([
        scope
          .run(async () => {
            await db.insertInto('orders').values({ note: 'dropped-unit' }).execute()
            const it = db
              .selectNoFrom(sql<number>`generate_series(1, 100000)`.as('n'))
              .stream(10)
              [Symbol.asyncIterator]()
            await it.next()
            // dropped: neither return() nor the rest of the rows
          })
          .then(
            () => 'resolved',
            (e: unknown) => (e as Error).message,
          ),
        new Promise((resolve) => setTimeout(() => resolve('still pending after 5 s'), 5000)),
      ])
      expect(r).toMatch(/maxHoldMs/)
      expect(await f.notes()).toEqual([])
      await new Promise((resolve) => setTimeout(resolve, 100))
      expect(pool.totalCount).toBe(pool.idleCount)
    } finally {
      await scope.close({ timeoutMs: 500 }).catch(() => {})
    }
  })
})

describe("outsideScope: 'pool' and streams", () => {
  it('a cursor stream outside any scope left by break: the pooled connection goes back, no portal or statement left; db.connection() there keeps one backend', async () => {
    const pooled = scopedKysely<DB>(f.scope, { dialect: f.dialect, outsideScope: 'pool' })
    let n = 0
    for await (const _row of pooled
      .selectNoFrom(sql<number>`generate_series(1, 1000000)`.as('n'))
      .stream(5)) {
      if (++n === 7) break
    }
    expect(n).toBe(7)
    await new Promise((r) => setTimeout(r, 50))
    expect(f.pool.totalCount).toBe(f.pool.idleCount)
    const active = (await backends(f.url, f.app)).filter((b) => b.state !== 'idle')
    expect(active).toEqual([])
    const pids = await pooled.connection().execute(async (conn) => {
      const a = await sql<{ pid: number }>`SELECT pg_backend_pid() AS pid`.execute(conn)
      const b = await sql<{ pid: number }>`SELECT pg_backend_pid() AS pid`.execute(conn)
      return [a.rows[0]!.pid, b.rows[0]!.pid]
    })
    expect(pids[0]).toBe(pids[1])
  })
})
