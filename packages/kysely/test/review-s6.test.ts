/**
 * Review probes (session 6) of packages/kysely/README.md's sentences that no
 * earlier test pinned, against a real PostgreSQL: the isolation levels a
 * session refuses, a `pool` that is not the dialect's, db.transaction() as the
 * outermost transaction after session.commit(), setAccessMode on a savepoint,
 * afterCommit hooks around trx.savepoint(), a backend ended by
 * idle_in_transaction_session_timeout (25P03), and remove() under scopedKysely.
 */
import { createScope, TransactionStateError } from '@scoped/core'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import { PostgresDialect, sql } from 'kysely'
import pg from 'pg'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { backends, independentQuery } from '../../../test/support/db.ts'
import { type DB, type Fixture, fixture } from './support.ts'

let f: Fixture

beforeAll(async () => {
  f = await fixture('kysely_review_s6', { max: 3 })
})

afterEach(async () => {
  expect(await f.idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  expect(f.scope.stats()).toMatchObject({ open: 0, holding: 0, waiting: 0 })
  await independentQuery(f.url, 'TRUNCATE orders')
})

afterAll(async () => {
  await f.close()
})

describe('isolation levels', () => {
  // README (Limits): "`setIsolationLevel('read uncommitted')` or `'snapshot'` inside a scope is a
  // `TypeError`; outside a scope with `outsideScope: 'pool'` every Kysely level works."
  it("setIsolationLevel('read uncommitted') inside a scope is a TypeError; nothing is committed", async () => {
    const { db, scope } = f
    const err = await scope
      .run(() =>
        db
          .transaction()
          .setIsolationLevel('read uncommitted')
          .execute(async (trx) => {
            await trx.insertInto('orders').values({ note: 'ru' }).execute()
          }),
      )
      .catch((e) => e)
    expect(err).toBeInstanceOf(TypeError)
    expect(err.message).toContain('read uncommitted')
    expect(await f.notes()).toEqual([])
  })

  it("outside a scope with outsideScope: 'pool', 'read uncommitted' works as in plain Kysely", async () => {
    const pooled = scopedKysely<DB>(f.scope, { dialect: f.dialect, outsideScope: 'pool' })
    const level = await pooled
      .transaction()
      .setIsolationLevel('read uncommitted')
      .execute(async (trx) => {
        await trx.insertInto('orders').values({ note: 'pool' }).execute()
        const { rows } = await sql<{
          transaction_isolation: string
        }>`show transaction_isolation`.execute(trx)
        return rows[0]?.transaction_isolation
      })
    expect(level).toBe('read uncommitted')
    expect(await f.notes()).toEqual(['pool'])
  })
})

describe('the pool option', () => {
  // README: "A `pool` that is not the dialect's pool is a `TypeError` at the first checkout."
  it("a pool that is not the dialect's: TypeError at the first checkout; nothing runs, nothing is left checked out", async () => {
    const other = new pg.Pool({ connectionString: f.url, max: 1 })
    const pool = new pg.Pool({ connectionString: f.url, max: 1, application_name: `${f.app}_x` })
    const dialect = new PostgresDialect({ pool })
    const scope = createScope({
      driver: kyselyDriver(dialect, { pool: other }),
      default: false,
      name: 'wrong-pool',
      leakDetectionMs: 0,
      onError: () => {},
    })
    const db = scopedKysely<DB>(scope, { dialect })
    try {
      const err = await scope
        .run(() => db.insertInto('orders').values({ note: 'x' }).execute())
        .catch((e) => e)
      expect(err).toBeInstanceOf(TypeError)
      expect(err.message).toMatch(/pool/)
      expect(await f.notes()).toEqual([])
      expect(pool.totalCount - pool.idleCount).toBe(0)
      expect(other.totalCount).toBe(0)
    } finally {
      await scope.close({ timeoutMs: 1000 })
      await other.end()
    }
  })
})

describe('db.transaction() after an explicit session.commit()', () => {
  // README: "when none is open yet (it is the first statement of the scope, or ... after an
  // explicit `session.commit()`), it is the **outermost transaction**: BEGIN with its
  // settings, COMMIT when `fn` returns".
  it('is the outermost transaction: its isolation level applies and it commits when fn returns', async () => {
    const { db, scope } = f
    await scope.run(async () => {
      await db.insertInto('orders').values({ note: 'unit 1' }).execute()
      await scope.getSession().commit()
      const level = await db
        .transaction()
        .setIsolationLevel('serializable')
        .execute(async (trx) => {
          await trx.insertInto('orders').values({ note: 'serializable' }).execute()
          const { rows } = await sql<{
            transaction_isolation: string
          }>`show transaction_isolation`.execute(trx)
          return rows[0]?.transaction_isolation
        })
      expect(level).toBe('serializable')
      expect(await f.notes()).toEqual(['unit 1', 'serializable'])
    })
  })
})

describe('setAccessMode on a savepoint', () => {
  // README: "`setIsolationLevel`/`setAccessMode` are refused there (`TransactionStateError`): a
  // savepoint cannot change them."
  it("setAccessMode('read only') once the unit of work began is a TransactionStateError", async () => {
    const { db, scope } = f
    const err = await scope
      .run(async () => {
        await db.insertInto('orders').values({ note: 'began' }).execute()
        await db
          .transaction()
          .setAccessMode('read only')
          .execute(async () => {})
      })
      .catch((e) => e)
    expect(err).toBeInstanceOf(TransactionStateError)
    expect(await f.notes()).toEqual([])
  })

  it("setAccessMode('read only') as the outermost transaction: a write in it is refused by the server", async () => {
    const { db, scope } = f
    const err = await scope
      .run(() =>
        db
          .transaction()
          .setAccessMode('read only')
          .execute((trx) => trx.insertInto('orders').values({ note: 'ro' }).execute()),
      )
      .catch((e) => e)
    expect(err.code).toBe('25006')
    expect(await f.notes()).toEqual([])
  })
})

describe('afterCommit and savepoints', () => {
  // README (Limits): "`trx.savepoint(name)` savepoints are SQL savepoints the core does not
  // track: `afterCommit` hooks registered between `savepoint()` and `rollbackToSavepoint()` are
  // not dropped. Nested `db.transaction()` calls (tracked savepoints) do drop them."
  it('a hook registered inside a nested db.transaction() that throws is dropped; one between trx.savepoint() and rollbackToSavepoint() runs', async () => {
    const { db, scope } = f
    const ran: string[] = []
    await scope.run(async () => {
      const s = scope.getSession()
      await db.insertInto('orders').values({ note: 'outer' }).execute()
      await db
        .transaction()
        .execute(async () => {
          s.afterCommit(() => {
            ran.push('tracked')
          })
          throw new Error('undo')
        })
        .catch(() => {})
      const trx = await db.startTransaction().execute()
      const sp = await trx.savepoint('untracked').execute()
      s.afterCommit(() => {
        ran.push('untracked')
      })
      await sp.rollbackToSavepoint('untracked').execute()
      await trx.commit().execute()
    })
    expect(ran).toEqual(['untracked'])
    expect(await f.notes()).toEqual(['outer'])
  })
})

describe('a backend ended by idle_in_transaction_session_timeout (25P03)', () => {
  // README: "`isFatal` ... PostgresDialect: SQLSTATE class 08, 57P01–57P03, 57P05, 25P03, ..."
  // and "A backend that dies ... fails the statement, the unit of work rolls back, and the
  // connection is destroyed, not pooled. With the `pool` option the process also survives it".
  it('the next statement fails, nothing is committed, the client is destroyed, the next scope works', async () => {
    const app = `${f.app}_iit`
    const pool = new pg.Pool({
      connectionString: f.url,
      max: 1,
      application_name: app,
      options: '-c idle_in_transaction_session_timeout=150',
    })
    const dialect = new PostgresDialect({ pool })
    const scope = createScope({
      driver: kyselyDriver(dialect, { pool }),
      default: false,
      name: 'iit',
      leakDetectionMs: 0,
      onError: () => {},
    })
    const db = scopedKysely<DB>(scope, { dialect })
    const pidOf = async () =>
      (await sql<{ pid: number }>`select pg_backend_pid() as pid`.execute(db)).rows[0]!.pid
    try {
      let pid = 0
      const err = await scope
        .run(async () => {
          pid = await pidOf()
          await db.insertInto('orders').values({ note: 'lost' }).execute()
          await new Promise((r) => setTimeout(r, 600))
          await db.insertInto('orders').values({ note: 'never' }).execute()
        })
        .catch((e) => e)
      expect(err).toBeInstanceOf(Error)
      expect(await f.notes()).toEqual([])
      expect(scope.stats().totals.destroyed).toBe(1)
      const next = await scope.run(async () => {
        await db.insertInto('orders').values({ note: 'next' }).execute()
        return pidOf()
      })
      expect(next).not.toBe(pid)
      expect(await f.notes()).toEqual(['next'])
      expect(pool.totalCount).toBe(pool.idleCount)
      expect(
        (await backends(f.url, app)).filter((b) => b.state?.startsWith('idle in transaction')),
      ).toEqual([])
    } finally {
      await scope.close({ timeoutMs: 1000 })
    }
  })
})

describe('remove() under scopedKysely', () => {
  // core README: "`remove()` rolls back what is not committed ... From the moment `remove()` is
  // called, `getSession()` opens a new session" — and scopedKysely's `db` runs on "the current
  // request's or job's session".
  it('db after remove() runs in a new session: the work before is rolled back, the work after commits', async () => {
    const { db, scope } = f
    const pids = await scope.run(async () => {
      const before = (await sql<{ pid: number }>`select pg_backend_pid() as pid`.execute(db))
        .rows[0]!.pid
      await db.insertInto('orders').values({ note: 'before' }).execute()
      await scope.remove()
      await db.insertInto('orders').values({ note: 'after' }).execute()
      return before
    })
    expect(typeof pids).toBe('number')
    expect(await f.notes()).toEqual(['after'])
  })
})
