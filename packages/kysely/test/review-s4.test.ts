/**
 * Review probes (session 4) of the Kysely side of the performance rewrite,
 * against a real PostgreSQL: SerialConnection's queued path (AsyncResource.bind)
 * after a statement that fails, and ScopedDriver's `release: 'idle'` handle
 * (`#retained`): a Kysely transaction keeps one connection until it ends, and
 * the connection goes back between bursts.
 */
import { AsyncLocalStorage } from 'node:async_hooks'
import { createScope } from '@scoped/core'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import { type Generated, PostgresDialect, sql } from 'kysely'
import pg from 'pg'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import { ChunkedCursor } from './support.ts'

interface DB {
  items: { id: Generated<number>; v: string; pid: Generated<number> }
}

let url: string
/** The pool of the latest setup(): each scope owns its pool and ends it when closed. */
let pool: pg.Pool
const scopes: { close(): Promise<void> }[] = []

beforeAll(async () => {
  url = await testDatabase('kysely_review_s4')
  await independentQuery(
    url,
    'CREATE TABLE items (id serial PRIMARY KEY, v text NOT NULL, pid int NOT NULL DEFAULT pg_backend_pid())',
  )
})

beforeEach(async () => {
  await independentQuery(url, 'TRUNCATE items')
})

afterAll(async () => {
  await Promise.all(scopes.map((s) => s.close()))
})

function setup(opts: { transaction: 'none' | 'auto'; release?: 'end' | 'idle' }) {
  pool = new pg.Pool({ connectionString: url, max: 2 })
  const dialect = new PostgresDialect({ pool, cursor: ChunkedCursor })
  const scope = createScope({
    driver: kyselyDriver(dialect, { pool }),
    default: false,
    leakDetectionMs: 0,
    ...opts,
  })
  scopes.push(scope)
  return { scope, db: scopedKysely<DB>(scope) }
}

const rows = () =>
  independentQuery<{ v: string; pid: number }>(url, 'SELECT v, pid FROM items ORDER BY id')

describe('SerialConnection: statements queued behind one that fails', () => {
  it("run in call order, each in its caller's async context, and succeed in autocommit ('none')", async () => {
    const { scope, db } = setup({ transaction: 'none' })
    const tag = new AsyncLocalStorage<string>()
    const seen: (string | undefined)[] = []
    const patched = new WeakSet<pg.PoolClient>()
    const onAcquire = (client: pg.PoolClient) => {
      if (patched.has(client)) return
      patched.add(client)
      const query = client.query
      ;(client as any).query = function (this: pg.PoolClient, ...args: any[]) {
        const text = typeof args[0] === 'string' ? args[0] : args[0]?.text
        // The user's statements only (the driver reads the backend's pid on a new connection).
        if (typeof text === 'string' && /^(insert|select \*)/i.test(text)) seen.push(tag.getStore())
        return (query as any).apply(this, args)
      }
    }
    pool.on('acquire', onAcquire)
    let results: string[]
    try {
      results = await scope.run(async () => {
        const settled = await Promise.allSettled([
          tag.run('slow', () =>
            sql`insert into items (v) select 'slow' from pg_sleep(0.02)`.execute(db),
          ),
          tag.run('bad', () => sql`select * from no_such_table`.execute(db)),
          tag.run('after 1', () => db.insertInto('items').values({ v: 'after 1' }).execute()),
          tag.run('after 2', () => db.insertInto('items').values({ v: 'after 2' }).execute()),
        ])
        return settled.map((r) => r.status)
      })
    } finally {
      pool.off('acquire', onAcquire)
    }
    expect(results).toEqual(['fulfilled', 'rejected', 'fulfilled', 'fulfilled'])
    expect(seen).toEqual(['slow', 'bad', 'after 1', 'after 2'])
    expect((await rows()).map((r) => r.v)).toEqual(['slow', 'after 1', 'after 2'])
    expect(pool.totalCount).toBe(pool.idleCount)
  })
})

describe("ScopedDriver with release: 'idle'", () => {
  it('a db.transaction() keeps one backend to its end and commits atomically; between bursts the connection is back in the pool', async () => {
    const { scope, db } = setup({ transaction: 'none', release: 'idle' })
    const checkedOut: number[] = []
    await scope.run(async () => {
      await db.insertInto('items').values({ v: 'before' }).execute()
      checkedOut.push(pool.totalCount - pool.idleCount)
      await db.transaction().execute(async (trx) => {
        await trx.insertInto('items').values({ v: 'tx 1' }).execute()
        await new Promise((r) => setTimeout(r, 10))
        // Still held while the transaction is open, though no statement runs.
        checkedOut.push(pool.totalCount - pool.idleCount)
        await trx.insertInto('items').values({ v: 'tx 2' }).execute()
      })
      checkedOut.push(pool.totalCount - pool.idleCount)
    })
    expect(checkedOut).toEqual([0, 1, 0])
    const r = await rows()
    expect(r.map((x) => x.v)).toEqual(['before', 'tx 1', 'tx 2'])
    expect(r[1]!.pid).toBe(r[2]!.pid)
  })

  it('a db.transaction() that throws rolls back every statement of it, and the connection goes back clean', async () => {
    const { scope, db } = setup({ transaction: 'none', release: 'idle' })
    const err = new Error('handler failed')
    const out = await scope
      .run(async () => {
        await db.transaction().execute(async (trx) => {
          await trx.insertInto('items').values({ v: 'lost 1' }).execute()
          await Promise.all([
            trx.insertInto('items').values({ v: 'lost 2' }).execute(),
            trx.insertInto('items').values({ v: 'lost 3' }).execute(),
          ])
          throw err
        })
      })
      .catch((e: unknown) => e)
    expect(out).toBe(err)
    expect(await rows()).toEqual([])
    expect(pool.totalCount).toBe(pool.idleCount)
    const stuck = await independentQuery(
      url,
      "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
    )
    expect(stuck[0]!.n).toBe(0)
  })

  it('a stream keeps the connection until its last row, then it goes back; the next statement checks out again', async () => {
    const { scope, db } = setup({ transaction: 'none', release: 'idle' })
    await independentQuery(
      url,
      "INSERT INTO items (v) SELECT 'row ' || g FROM generate_series(1, 30) g",
    )
    const out = await scope.run(async () => {
      const heldDuring: number[] = []
      const pids = new Set<number>()
      for await (const row of db.selectFrom('items').select(['v', 'pid']).stream(5)) {
        pids.add(row.pid)
        if (heldDuring.length < 3) {
          await new Promise((r) => setTimeout(r, 2))
          heldDuring.push(pool.totalCount - pool.idleCount)
        }
      }
      const after = pool.totalCount - pool.idleCount
      const { n } = await db
        .selectFrom('items')
        .select((eb) => eb.fn.countAll<string>().as('n'))
        .executeTakeFirstOrThrow()
      return { heldDuring, after, n: Number(n) }
    })
    expect(out).toEqual({ heldDuring: [1, 1, 1], after: 0, n: 30 })
    expect(pool.totalCount).toBe(pool.idleCount)
  })
})
