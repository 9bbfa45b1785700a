/**
 * When BEGIN, COMMIT or ROLLBACK throws, or the backend dies, nothing leaks:
 * no connection stays checked out, nothing half-done is committed, and the
 * process does not crash. Plain Kysely 0.28 keeps a ControlledTransaction's
 * connection checked out when its COMMIT throws (kysely-org/kysely#1990), and
 * a pg client whose backend dies while checked out emits an 'error' nobody
 * listens to (an uncaught exception).
 */
import { TransactionStateError } from '@scoped/core'
import { scopedKysely } from '@scoped/kysely'
import { CompiledQuery, type DatabaseConnection, type Driver, PostgresDialect } from 'kysely'
import type pg from 'pg'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { independentQuery } from '../../../test/support/db.ts'
import { type DB, type Fixture, fixture } from './support.ts'

/** PostgresDialect whose next BEGIN finds its backend gone: a real failure, triggered on demand. */
class BackendDiesAtBegin extends PostgresDialect {
  armed = false

  override createDriver(): Driver {
    const driver = super.createDriver()
    const begin = driver.beginTransaction.bind(driver)
    driver.beginTransaction = async (conn, settings) => {
      if (this.armed) {
        this.armed = false
        const kill = CompiledQuery.raw('SELECT pg_terminate_backend(pg_backend_pid())')
        await conn.executeQuery(kill).catch(() => {})
      }
      return begin(conn, settings)
    }
    return driver
  }
}

let f: Fixture
let dying: BackendDiesAtBegin

beforeAll(async () => {
  f = await fixture('kysely_failures', {
    dialect: (pool: pg.Pool) => {
      dying = new BackendDiesAtBegin({ pool })
      return dying
    },
  })
})

afterEach(async () => {
  expect(await f.idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  await independentQuery(f.url, 'TRUNCATE orders, tickets')
})

afterAll(async () => {
  await f.close()
})

const duplicateTickets = [{ code: 'T-1' }, { code: 'T-1' }]
const tickets = async () => (await independentQuery(f.url, 'SELECT code FROM tickets')).length

async function backendPid(db: typeof f.db): Promise<number> {
  const { rows } = await db.executeQuery<{ pid: number }>(
    CompiledQuery.raw('SELECT pg_backend_pid() AS pid'),
  )
  return rows[0]!.pid
}

/** Terminate a backend from outside, and give its client the moment it needs to notice. */
async function terminate(pid: number): Promise<void> {
  await independentQuery(f.url, 'SELECT pg_terminate_backend($1)', [pid])
  await new Promise((r) => setTimeout(r, 100))
}

describe('COMMIT fails (a deferred unique constraint is checked at COMMIT)', () => {
  it('startTransaction() as the outermost transaction of a session: commit() rejects, nothing committed, nothing leaked', async () => {
    const { db, scope } = f
    const outcome = await scope.run(async () => {
      const trx = await db.startTransaction().execute()
      await trx.insertInto('tickets').values(duplicateTickets).execute()
      const err = await trx
        .commit()
        .execute()
        .catch((e) => e)
      // The usual `catch { await trx.rollback() }` after it is harmless.
      await trx.rollback().execute()
      return err
    })
    expect(outcome.code).toBe('23505')
    expect(await tickets()).toBe(0)
  })

  it('startTransaction() as a savepoint: the unit of work fails at its COMMIT, the scope rejects, nothing committed', async () => {
    const { db, scope } = f
    const err = await scope
      .run(async () => {
        await db.insertInto('orders').values({ note: 'with the tickets' }).execute()
        const trx = await db.startTransaction().execute()
        await trx.insertInto('tickets').values(duplicateTickets).execute()
        await trx.commit().execute() // RELEASE SAVEPOINT: deferred constraints wait for the real COMMIT
      })
      .catch((e) => e)
    expect(err.code).toBe('23505')
    expect(await tickets()).toBe(0)
    expect(await f.notes()).toEqual([])
  })

  it("outside a scope (outsideScope: 'pool'): the connection is back in the pool as soon as commit() rejects", async () => {
    const db = scopedKysely<DB>(f.scope, { outsideScope: 'pool' })
    const trx = await db.startTransaction().execute()
    await trx.insertInto('tickets').values(duplicateTickets).execute()
    const err = await trx
      .commit()
      .execute()
      .catch((e) => e)
    expect(err.code).toBe('23505')
    // No rollback() call needed: plain Kysely would still hold the connection here.
    expect(f.pool.totalCount - f.pool.idleCount).toBe(0)
    await trx.rollback().execute() // and the usual rollback() afterwards is a no-op
    expect(await tickets()).toBe(0)
  })
})

describe('ROLLBACK fails (the backend died in the transaction)', () => {
  it('outside a scope: rollback() rejects, the dead connection is destroyed, not pooled, and the process survives', async () => {
    const db = scopedKysely<DB>(f.scope, { outsideScope: 'pool' })
    const trx = await db.startTransaction().execute()
    await trx.insertInto('orders').values({ note: 'lost' }).execute()
    const total = f.pool.totalCount
    await terminate(await backendPid(trx))
    await expect(trx.rollback().execute()).rejects.toThrow()
    expect(f.pool.totalCount).toBe(total - 1)
    expect(await f.notes()).toEqual([])
  })

  it('in a session: rollback() resolves (the server discarded the transaction with its backend), the connection is destroyed', async () => {
    const { db, scope } = f
    const before = scope.stats().totals.destroyed
    await scope.run(async () => {
      const trx = await db.startTransaction().execute()
      await trx.insertInto('orders').values({ note: 'lost' }).execute()
      await terminate(await backendPid(trx))
      await trx.rollback().execute()
      expect(trx.isRolledBack).toBe(true)
    })
    expect(scope.stats().totals.destroyed).toBe(before + 1)
    expect(await f.notes()).toEqual([])
    // The next unit of work gets a healthy connection.
    await scope.run(() => db.insertInto('orders').values({ note: 'next' }).execute())
    expect(await f.notes()).toEqual(['next'])
  })
})

describe('BEGIN fails', () => {
  it('outside a scope: startTransaction() rejects and the connection goes straight back', async () => {
    const db = scopedKysely<DB>(f.scope, { outsideScope: 'pool' })
    // PostgreSQL has no SNAPSHOT isolation level: the BEGIN is a syntax error.
    const err = await db
      .startTransaction()
      .setIsolationLevel('snapshot')
      .execute()
      .catch((e) => e)
    expect(err.code).toBe('42601')
    expect(f.pool.totalCount - f.pool.idleCount).toBe(0)
  })

  it('in a session: the first statement rejects, the broken connection is destroyed, the next scope works', async () => {
    const { db, scope } = f
    const before = scope.stats().totals.destroyed
    dying.armed = true
    const err = await scope
      .run(() => db.insertInto('orders').values({ note: 'never' }).execute())
      .catch((e) => e)
    expect(err).toBeInstanceOf(Error)
    expect(scope.stats().totals.destroyed).toBe(before + 1)
    await scope.run(() => db.insertInto('orders').values({ note: 'next' }).execute())
    expect(await f.notes()).toEqual(['next'])
  })
})

describe('a statement failed and its error was caught', () => {
  it('the unit of work does not commit (PostgreSQL would silently roll it back): the scope rejects and says why', async () => {
    const { db, scope } = f
    const err = await scope
      .run(async () => {
        const a = await db
          .insertInto('orders')
          .values({ note: 'a' })
          .returning('id')
          .executeTakeFirstOrThrow()
        await db
          .insertInto('orders')
          .values({ id: a.id, note: 'duplicate id' })
          .execute()
          .catch(() => {})
        await db
          .insertInto('orders')
          .values({ note: 'b' })
          .execute()
          .catch(() => {})
      })
      .catch((e) => e)
    expect(err).toBeInstanceOf(TransactionStateError)
    expect(err.message).toContain('COMMIT was not sent')
    expect(await f.notes()).toEqual([])
  })

  it('inside db.transaction() (a savepoint) the error is contained and the unit of work commits', async () => {
    const { db, scope } = f
    await scope.run(async () => {
      const first = await db
        .insertInto('orders')
        .values({ note: 'a' })
        .returning('id')
        .executeTakeFirstOrThrow()
      await db
        .transaction()
        .execute((trx) =>
          trx.insertInto('orders').values({ id: first.id, note: 'duplicate id' }).execute(),
        )
        .catch(() => {})
      await db.insertInto('orders').values({ note: 'b' }).execute()
    })
    expect(await f.notes()).toEqual(['a', 'b'])
  })
})

describe('the backend dies while a session holds its connection', () => {
  it('the statement and the scope reject, the connection is destroyed, the process survives', async () => {
    const { db, scope } = f
    const before = scope.stats().totals.destroyed
    const err = await scope
      .run(async () => {
        await db.insertInto('orders').values({ note: 'lost' }).execute()
        await terminate(await backendPid(db))
        await db.insertInto('orders').values({ note: 'never' }).execute()
      })
      .catch((e) => e)
    expect(err).toBeInstanceOf(Error)
    expect(scope.stats().totals.destroyed).toBe(before + 1)
    expect(await f.notes()).toEqual([])
    await scope.run(() => db.insertInto('orders').values({ note: 'next' }).execute())
    expect(await f.notes()).toEqual(['next'])
  })
})

// A connection object that no kyselyDriver made is refused by name, not used.
it('a foreign DatabaseConnection handed to the driver is refused', async () => {
  const foreign: DatabaseConnection = {
    executeQuery: async () => ({ rows: [] }),
    streamQuery: async function* () {},
  }
  await expect(f.scope.driver.commit!(foreign)).rejects.toThrow('not checked out by a kyselyDriver')
})
