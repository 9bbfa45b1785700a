/**
 * scopedKysely against a real PostgreSQL through PostgresDialect and a pg.Pool:
 * the global `db` runs in the current scope's unit of work; db.transaction()
 * and db.startTransaction() are its savepoints; concurrent queries share the
 * one connection; outside a scope it throws (or uses the pool when asked).
 */
import { AsyncLocalStorage } from 'node:async_hooks'
import {
  createScope,
  NoActiveScopeError,
  ScopeClosedError,
  SessionClosedError,
  TransactionStateError,
} from '@scoped/core'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import { CamelCasePlugin, Kysely, type LogEvent, PostgresDialect, sql } from 'kysely'
import pg from 'pg'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { independentQuery } from '../../../test/support/db.ts'
import { type DB, type Fixture, fixture } from './support.ts'

let f: Fixture

beforeAll(async () => {
  f = await fixture('scoped_kysely')
})

afterEach(async () => {
  // Every test leaves the pool as it found it: nothing checked out, no open transaction.
  expect(await f.idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  await independentQuery(f.url, 'TRUNCATE orders, archive.orders, tickets')
})

afterAll(async () => {
  await f.close()
})

const txid = sql<string>`txid_current()::text`.as('xid')
const pid = sql<number>`pg_backend_pid()`.as('pid')

async function rowsOf(table = 'orders') {
  return independentQuery<{ note: string; pid: number; xid: string; xmin: string }>(
    f.url,
    `SELECT note, pid, xid::text, xmin::text FROM ${table} ORDER BY id`,
  )
}

describe('the unit of work of a scope', () => {
  it('three writes and then a throw: none of them is visible afterwards', async () => {
    const { db, scope } = f
    const err = await scope
      .run(
        async () => {
          await db.insertInto('orders').values({ note: 'a' }).execute()
          await db.insertInto('orders').values({ note: 'b' }).execute()
          await db.insertInto('orders').values({ note: 'c' }).execute()
          throw new Error('payment declined')
        },
        { name: 'POST /orders' },
      )
      .catch((e) => e)
    expect(err.message).toBe('payment declined')
    expect(await f.notes()).toEqual([])
  })

  it('three writes without a throw: all committed together, by one backend in one transaction', async () => {
    const { db, scope } = f
    let seenInside: string[] = ['not checked']
    await scope.run(async () => {
      await db.insertInto('orders').values({ note: 'a' }).execute()
      await db.insertInto('orders').values({ note: 'b' }).execute()
      await db.insertInto('orders').values({ note: 'c' }).execute()
      // Not committed yet: another connection sees nothing until the scope ends.
      seenInside = await f.notes()
    })
    expect(seenInside).toEqual([])
    const rows = await rowsOf()
    expect(rows.map((r) => r.note)).toEqual(['a', 'b', 'c'])
    expect(new Set(rows.map((r) => r.pid)).size).toBe(1)
    expect(new Set(rows.map((r) => r.xid)).size).toBe(1)
    expect(new Set(rows.map((r) => r.xmin)).size).toBe(1)
  })

  it('a scope that never queries checks nothing out', async () => {
    const before = f.scope.stats().totals.acquired
    await f.scope.run(async () => {
      f.db.selectFrom('orders').selectAll() // building a query is not running it
    })
    expect(f.scope.stats().totals.acquired).toBe(before)
  })
})

describe('db.transaction() inside a session', () => {
  it('is a savepoint: a throw rolls back only its own writes, the unit of work goes on', async () => {
    const { db, scope } = f
    await scope.run(async () => {
      await db.insertInto('orders').values({ note: 'before' }).execute()
      const err = await db
        .transaction()
        .execute(async (trx) => {
          await trx.insertInto('orders').values({ note: 'inner (trx)' }).execute()
          await db.insertInto('orders').values({ note: 'inner (global db)' }).execute()
          throw new Error('inner failed')
        })
        .catch((e) => e)
      expect(err.message).toBe('inner failed')
      const kept = await db.transaction().execute(async (trx) => {
        await trx.insertInto('orders').values({ note: 'inner ok' }).execute()
        return 'returned'
      })
      expect(kept).toBe('returned')
      await db.insertInto('orders').values({ note: 'after' }).execute()
    })
    const rows = await rowsOf()
    expect(rows.map((r) => r.note)).toEqual(['before', 'inner ok', 'after'])
    expect(new Set(rows.map((r) => r.xid)).size).toBe(1)
  })

  it('the global db inside the trx callback joins the same transaction, also concurrently, without deadlock', async () => {
    const { db, scope } = f
    const seen = await scope.run(() =>
      db.transaction().execute(async (trx) => {
        const viaTrx = await trx.selectNoFrom([txid, pid]).executeTakeFirstOrThrow()
        const all = await Promise.all([
          db.selectNoFrom([txid, pid]).executeTakeFirstOrThrow(),
          trx.insertInto('orders').values({ note: 'trx' }).execute(),
          db.insertInto('orders').values({ note: 'db' }).execute(),
          db
            .transaction()
            .execute((inner) => inner.selectNoFrom([txid, pid]).executeTakeFirstOrThrow()),
        ])
        return [viaTrx, all[0], all[3]]
      }),
    )
    expect(new Set(seen.map((s) => s.xid)).size).toBe(1)
    expect(new Set(seen.map((s) => s.pid)).size).toBe(1)
    expect((await f.notes()).sort()).toEqual(['db', 'trx'])
  })

  it('is the outermost transaction when none is open yet: its settings apply, it commits at its end', async () => {
    const { db, scope } = f
    await scope.run(async () => {
      const level = await db
        .transaction()
        .setIsolationLevel('serializable')
        .setAccessMode('read write')
        .execute(async (trx) => {
          await trx.insertInto('orders').values({ note: 'first' }).execute()
          const { rows } = await sql<{
            transaction_isolation: string
          }>`show transaction_isolation`.execute(trx)
          return rows[0]?.transaction_isolation
        })
      expect(level).toBe('serializable')
      // Committed when the callback returned, before the scope ends.
      expect(await f.notes()).toEqual(['first'])
      // The next statement begins a new unit of work.
      await db.insertInto('orders').values({ note: 'second' }).execute()
      expect(await f.notes()).toEqual(['first'])
    })
    const rows = await rowsOf()
    expect(rows.map((r) => r.note)).toEqual(['first', 'second'])
    expect(new Set(rows.map((r) => r.xid)).size).toBe(2)
  })

  it('cannot set an isolation level once the unit of work began (it would be a savepoint), and says so', async () => {
    const { db, scope } = f
    const err = await scope
      .run(async () => {
        await db.insertInto('orders').values({ note: 'began' }).execute()
        await db
          .transaction()
          .setIsolationLevel('serializable')
          .execute(async () => {})
      })
      .catch((e) => e)
    expect(err).toBeInstanceOf(TransactionStateError)
    expect(err.message).toContain('savepoint and cannot set isolation')
    expect(await f.notes()).toEqual([])
  })

  it("in transaction: 'none' mode, statements autocommit and db.transaction() is a real BEGIN/COMMIT", async () => {
    const { db, scope } = f
    await scope.run(
      async () => {
        await db.insertInto('orders').values({ note: 'autocommitted' }).execute()
        expect(await f.notes()).toEqual(['autocommitted'])
        await expect(
          db.transaction().execute(async (trx) => {
            await trx.insertInto('orders').values({ note: 'rolled back' }).execute()
            throw new Error('no')
          }),
        ).rejects.toThrow('no')
        await db.transaction().execute(async (trx) => {
          await trx.insertInto('orders').values({ note: 'committed' }).execute()
        })
        expect(await f.notes()).toEqual(['autocommitted', 'committed'])
      },
      { transaction: 'none' },
    )
  })
})

describe('two db.transaction() calls at once in one session', () => {
  it('cannot both be savepoints of one connection: one rejects, and the unit of work rolls back entirely', async () => {
    const { db, scope } = f
    const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
    const settled = await scope.run(async () => {
      await db.insertInto('orders').values({ note: 'before' }).execute()
      return Promise.allSettled([
        db.transaction().execute(async (trx) => {
          await trx.insertInto('orders').values({ note: 'A' }).execute()
          await sleep(20)
        }),
        db.transaction().execute(async (trx) => {
          await trx.insertInto('orders').values({ note: 'B' }).execute()
          await sleep(60)
        }),
      ])
    })
    const rejected = settled.filter((s) => s.status === 'rejected') as PromiseRejectedResult[]
    expect(rejected).toHaveLength(1)
    expect(rejected[0]!.reason).toBeInstanceOf(TransactionStateError)
    expect(rejected[0]!.reason.message).toContain('overlapped')
    // Not A without B, nor 'before' without either: nothing.
    expect(await f.notes()).toEqual([])
  })

  it('one after another they are fine', async () => {
    const { db, scope } = f
    await scope.run(async () => {
      for (const note of ['A', 'B']) {
        await db.transaction().execute((trx) => trx.insertInto('orders').values({ note }).execute())
      }
    })
    expect(await f.notes()).toEqual(['A', 'B'])
  })
})

describe('db.startTransaction() inside a session', () => {
  /** Kysely's own controlled-transaction example, with savepoints. */
  async function controlled(k: Kysely<DB>) {
    const trx = await k.startTransaction().execute()
    await trx.insertInto('orders').values({ note: 'jennifer' }).execute()
    const afterJennifer = await trx.savepoint('after_jennifer').execute()
    await afterJennifer.insertInto('orders').values({ note: 'catto' }).execute()
    await afterJennifer.rollbackToSavepoint('after_jennifer').execute()
    await afterJennifer.insertInto('orders').values({ note: 'doggo' }).execute()
    await afterJennifer.releaseSavepoint('after_jennifer').execute()
    await trx.insertInto('orders').values({ note: 'audit' }).execute()
    await trx.commit().execute()
    const closed = await trx
      .selectFrom('orders')
      .selectAll()
      .execute()
      .catch((e) => e)
    return { committed: trx.isCommitted, afterCommit: closed.message }
  }

  it('savepoint(), rollbackToSavepoint(), releaseSavepoint() and commit() behave as in plain Kysely', async () => {
    const plainPool = new pg.Pool({ connectionString: f.url, max: 1 })
    const plain = new Kysely<DB>({ dialect: new PostgresDialect({ pool: plainPool }) })
    const expected = await controlled(plain)
    const expectedNotes = await f.notes()
    await plain.destroy()
    await independentQuery(f.url, 'TRUNCATE orders')

    const got = await f.scope.run(() => controlled(f.db))
    expect(got).toEqual(expected)
    expect(expected).toEqual({ committed: true, afterCommit: 'Transaction is already committed' })
    expect(await f.notes()).toEqual(expectedNotes)
    expect(expectedNotes).toEqual(['jennifer', 'doggo', 'audit'])
  })

  it('inside a begun unit of work, rollback() undoes only its own writes', async () => {
    const { db, scope } = f
    await scope.run(async () => {
      await db.insertInto('orders').values({ note: 'kept' }).execute()
      const trx = await db.startTransaction().execute()
      await trx.insertInto('orders').values({ note: 'undone' }).execute()
      await trx.rollback().execute()
      expect(trx.isRolledBack).toBe(true)
      await db.insertInto('orders').values({ note: 'kept too' }).execute()
    })
    expect(await f.notes()).toEqual(['kept', 'kept too'])
  })
})

describe('concurrency in one session', () => {
  it('Promise.all of 20 queries: one connection, every result right, no pg deprecation warning', async () => {
    const { db, scope } = f
    const warnings: Error[] = []
    const onWarning = (w: Error) => warnings.push(w)
    process.on('warning', onWarning)
    try {
      const before = scope.stats().totals.acquired
      const results = await scope.run(() =>
        Promise.all(
          Array.from({ length: 20 }, (_, i) =>
            db.selectNoFrom([sql<number>`${i}::int`.as('n'), pid, txid]).executeTakeFirstOrThrow(),
          ),
        ),
      )
      expect(results.map((r) => r.n)).toEqual(Array.from({ length: 20 }, (_, i) => i))
      expect(new Set(results.map((r) => r.pid)).size).toBe(1)
      expect(new Set(results.map((r) => r.xid)).size).toBe(1)
      expect(scope.stats().totals.acquired - before).toBe(1)
      await new Promise((r) => setTimeout(r, 10)) // warnings are emitted on a later tick
      const deprecation = (w: Error) => w.message.includes('already executing a query')
      expect(warnings.filter(deprecation)).toEqual([])

      // The capture works: overlapping queries straight on one pg client do warn (from the third
      // on). pg warns once per process, so this check comes after ours.
      const client = await f.pool.connect()
      try {
        await Promise.all([
          client.query('SELECT 1'),
          client.query('SELECT 2'),
          client.query('SELECT 3'),
        ])
      } finally {
        client.release()
      }
      await new Promise((r) => setTimeout(r, 10))
      expect(warnings.filter(deprecation)).toHaveLength(1)
    } finally {
      process.off('warning', onWarning)
    }
  })
})

describe('async context of queued statements', () => {
  it("a statement that waited for its turn is sent in its caller's async context (AsyncLocalStorage, tracing)", async () => {
    // Instrumentation (OpenTelemetry's pg spans, request-id loggers) reads the async context when
    // the pg client's query() is called: a statement queued behind another in the session must
    // be sent in its own caller's context, not in the previous statement's.
    const { db, scope } = f
    const tag = new AsyncLocalStorage<string>()
    const seen: (string | undefined)[] = []
    const patch = (client: pg.PoolClient) => {
      const query = client.query
      ;(client as any).query = function (this: pg.PoolClient, ...args: any[]) {
        if (typeof args[0] === 'string' && args[0].startsWith('select')) seen.push(tag.getStore())
        return (query as any).apply(this, args)
      }
      return () => {
        ;(client as any).query = query
      }
    }
    let unpatch: (() => void) | undefined
    const onAcquire = (client: pg.PoolClient) => {
      unpatch = patch(client)
    }
    f.pool.on('acquire', onAcquire)
    try {
      await scope.run(
        () =>
          Promise.all(
            ['first', 'second', 'third'].map((name, i) =>
              tag.run(name, () =>
                db.selectNoFrom(sql<number>`${i}::int`.as('n')).executeTakeFirstOrThrow(),
              ),
            ),
          ),
        { transaction: 'none' },
      )
    } finally {
      f.pool.off('acquire', onAcquire)
      unpatch?.()
    }
    expect(seen).toEqual(['first', 'second', 'third'])
  })
})

describe('db.connection()', () => {
  it("is the session's connection, inside its unit of work", async () => {
    const { db, scope } = f
    await scope.run(async () => {
      const outer = await db.selectNoFrom([txid, pid]).executeTakeFirstOrThrow()
      const inner = await db.connection().execute(async (conn) => {
        await conn.insertInto('orders').values({ note: 'via connection' }).execute()
        return conn.selectNoFrom([txid, pid]).executeTakeFirstOrThrow()
      })
      expect(inner).toEqual(outer)
    })
    expect(await f.notes()).toEqual(['via connection'])
  })
})

describe('after and outside a scope', () => {
  it('db used after its scope ended throws SessionClosedError', async () => {
    const { db, scope } = f
    let open!: () => void
    const gate = new Promise<void>((r) => {
      open = r
    })
    let late!: Promise<unknown>
    await scope.run(
      async () => {
        await db.insertInto('orders').values({ note: 'in time' }).execute()
        // Work that outlives the request: it runs (in the request's context) after it ended.
        late = gate.then(() => db.selectFrom('orders').selectAll().execute())
        late.catch(() => {})
      },
      { name: 'GET /late' },
    )
    open()
    const err = (await late.catch((e) => e)) as Error
    expect(err).toBeInstanceOf(SessionClosedError)
    expect(err.message).toContain("'GET /late'")
    expect(await f.notes()).toEqual(['in time'])
  })

  it("outside any scope, outsideScope: 'throw' (the default) throws NoActiveScopeError", async () => {
    const err = await f.db
      .selectFrom('orders')
      .selectAll()
      .execute()
      .catch((e) => e)
    expect(err).toBeInstanceOf(NoActiveScopeError)
    expect(err.message).toContain('scopedKysely')
    expect(err.message).toContain('runJob')
  })

  it("outside any scope, outsideScope: 'pool' runs on the pool as plain Kysely (autocommit, real transactions)", async () => {
    const db = scopedKysely<DB>(f.scope, { outsideScope: 'pool' })
    await db.insertInto('orders').values({ note: 'autocommit' }).execute()
    expect(await f.notes()).toEqual(['autocommit'])
    await expect(
      db.transaction().execute(async (trx) => {
        await trx.insertInto('orders').values({ note: 'rolled back' }).execute()
        throw new Error('no')
      }),
    ).rejects.toThrow('no')
    await db
      .transaction()
      .execute((trx) => trx.insertInto('orders').values({ note: 'tx' }).execute())
    expect(await f.notes()).toEqual(['autocommit', 'tx'])
    // Inside a scope the same db still joins the unit of work.
    await f.scope
      .run(async () => {
        await db.insertInto('orders').values({ note: 'in scope' }).execute()
        throw new Error('undo')
      })
      .catch(() => {})
    expect(await f.notes()).toEqual(['autocommit', 'tx'])
  })
})

describe('a real Kysely', () => {
  it('is an instance of Kysely; plugins, withPlugin and withSchema work and stay in the unit of work', async () => {
    const { scope } = f
    const db = scopedKysely<DB>(scope, { plugins: [new CamelCasePlugin()] })
    expect(db).toBeInstanceOf(Kysely)
    expect(db.withPlugin(new CamelCasePlugin())).toBeInstanceOf(Kysely)
    const res = await scope.run(async () => {
      const camel = await db.selectNoFrom(sql<number>`1`.as('some_value')).executeTakeFirstOrThrow()
      await db.withSchema('archive').insertInto('orders').values({ note: 'archived' }).execute()
      const plain = await f.db
        .withoutPlugins()
        .selectNoFrom(sql<number>`2`.as('other_value'))
        .executeTakeFirstOrThrow()
      const outer = await db.selectNoFrom([txid]).executeTakeFirstOrThrow()
      const viaSchema = await db
        .withSchema('archive')
        .selectNoFrom([txid])
        .executeTakeFirstOrThrow()
      return { camel, plain, same: outer.xid === viaSchema.xid }
    })
    expect(res).toEqual({ camel: { someValue: 1 }, plain: { other_value: 2 }, same: true })
    expect(await f.notes('archive.orders')).toEqual(['archived'])
    expect(await f.notes()).toEqual([])
  })

  it('logs queries and errors as plain Kysely does (`log`)', async () => {
    const events: LogEvent[] = []
    const db = scopedKysely<DB>(f.scope, { log: (e) => void events.push(e), outsideScope: 'pool' })
    await f.scope
      .run(async () => {
        await db.selectFrom('orders').select('note').where('note', '=', 'x').execute()
        await db
          .selectNoFrom(sql<number>`1/0`.as('x'))
          .execute()
          .catch(() => {})
        throw new Error('roll back')
      })
      .catch(() => {})
    await db.selectNoFrom(sql<number>`2`.as('y')).execute() // outside a scope, on the pool
    expect(events.map((e) => [e.level, e.query.sql])).toEqual([
      ['query', 'select "note" from "orders" where "note" = $1'],
      ['error', 'select 1/0 as "x"'],
      ['query', 'select 2 as "y"'],
    ])
    expect(events[0]!.query.parameters).toEqual(['x'])
    expect(events[0]!.queryDurationMillis).toBeGreaterThanOrEqual(0)
    expect(events[1]!.level === 'error' && (events[1]!.error as { code: string }).code).toBe(
      '22012',
    )
  })
})

describe('db.destroy()', () => {
  it('closes the scope (it owns the pool): the pool ends and new scopes are refused', async () => {
    const pool = new pg.Pool({ connectionString: f.url, max: 1 })
    const dialect = new PostgresDialect({ pool })
    const scope = createScope({ driver: kyselyDriver(dialect, { pool }), default: false })
    const db = scopedKysely<DB>(scope)
    await scope.run(() => db.selectFrom('orders').selectAll().execute())
    await db.destroy()
    expect(pool.ended).toBe(true)
    await expect(scope.run(async () => {})).rejects.toBeInstanceOf(ScopeClosedError)
  })
})
