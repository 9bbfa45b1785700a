/**
 * kyselyDriver(dialect) used directly as a scope's driver (no scopedKysely):
 * sessions hold Kysely DatabaseConnections; TxOptions become Kysely's
 * transaction settings; PostgreSQL errors are classified by SQLSTATE; with
 * the dialect's pg.Pool, connections are really destroyed and statements
 * really cancelled; without it, the documented limit.
 */
import { createScope, type Scope, ScopeAbortedError } from '@scoped/core'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import { CompiledQuery, type DatabaseConnection, PostgresDialect, SqliteDialect } from 'kysely'
import pg from 'pg'
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'

let url: string
let pool: pg.Pool
let scope: Scope<DatabaseConnection>
const app = `kysely_driver_${process.pid}`

beforeAll(async () => {
  url = await testDatabase('kysely_driver')
  await independentQuery(
    url,
    'CREATE TABLE t (v text NOT NULL, xid bigint NOT NULL DEFAULT txid_current()); ' +
      'CREATE TABLE counter (id int PRIMARY KEY, v int NOT NULL); INSERT INTO counter VALUES (1, 0)',
  )
  pool = new pg.Pool({ connectionString: url, application_name: app, max: 3 })
  const dialect = new PostgresDialect({ pool })
  scope = createScope({
    driver: kyselyDriver(dialect, { pool }),
    name: 'driver-test',
    default: false,
  })
})

afterEach(async () => {
  expect(pool.totalCount - pool.idleCount).toBe(0)
  await independentQuery(url, 'TRUNCATE t')
})

afterAll(async () => {
  await scope.close()
})

/** A statement on the current session's connection, as an application without scopedKysely writes it. */
async function query<R = Record<string, unknown>>(
  text: string,
  params: unknown[] = [],
): Promise<R[]> {
  const { rows } = await scope
    .getSession()
    .use((conn) => conn.executeQuery<R>(CompiledQuery.raw(text, params)))
  return rows
}

const values = async () =>
  (await independentQuery(url, 'SELECT v, xid::text FROM t ORDER BY v')) as {
    v: string
    xid: string
  }[]

describe('kyselyDriver with createScope', () => {
  it('a scope with two writes and a throw leaves nothing', async () => {
    const err = await scope
      .run(async () => {
        await query("INSERT INTO t (v) VALUES ('a')")
        await query("INSERT INTO t (v) VALUES ('b')")
        throw new Error('boom')
      })
      .catch((e) => e)
    expect(err.message).toBe('boom')
    expect(await values()).toEqual([])
  })

  it('without the throw both writes are committed, in one transaction', async () => {
    await scope.run(async () => {
      await query("INSERT INTO t (v) VALUES ('a')")
      await query("INSERT INTO t (v) VALUES ('b')")
    })
    const rows = await values()
    expect(rows.map((r) => r.v)).toEqual(['a', 'b'])
    expect(rows[0]!.xid).toBe(rows[1]!.xid)
  })

  it('transaction(fn, { isolation, readOnly }) becomes the BEGIN of Kysely’s driver', async () => {
    const settings = await scope.run(
      () =>
        scope.getSession().transaction(
          async () => {
            const [iso] = await query<{ transaction_isolation: string }>(
              'SHOW transaction_isolation',
            )
            const [ro] = await query<{ transaction_read_only: string }>(
              'SHOW transaction_read_only',
            )
            return [iso!.transaction_isolation, ro!.transaction_read_only]
          },
          { isolation: 'serializable', readOnly: true },
        ),
      { transaction: 'none' },
    )
    expect(settings).toEqual(['serializable', 'on'])
  })

  it('a serialization failure (40001) is retryable: transaction(fn, { retry }) runs fn again and succeeds', async () => {
    let attempts = 0
    await scope.run(() =>
      scope.getSession().transaction(
        async () => {
          attempts++
          await query('SELECT v FROM counter WHERE id = 1') // the snapshot is taken here
          if (attempts === 1)
            await independentQuery(url, 'UPDATE counter SET v = v + 10 WHERE id = 1')
          await query('UPDATE counter SET v = v + 1 WHERE id = 1')
        },
        { isolation: 'repeatable read', retry: { attempts: 3, backoffMs: 1 } },
      ),
    )
    expect(attempts).toBe(2)
    expect(await independentQuery(url, 'SELECT v FROM counter')).toEqual([{ v: 11 }])
  })

  it('isFatal: a terminated backend is fatal, an error in a statement is not', async () => {
    const driver = scope.driver
    await scope.run(async () => {
      const session = scope.getSession()
      const conn = await session.connection()
      const [{ pid }] = (await query<{ pid: number }>('SELECT pg_backend_pid() AS pid')) as [
        { pid: number },
      ]
      const divided = await query('SELECT 1/0').catch((e) => e)
      expect(divided.code).toBe('22012')
      expect(driver.isFatal!(conn, divided)).toBe(false)
      await independentQuery(url, 'SELECT pg_terminate_backend($1)', [pid])
      await new Promise((r) => setTimeout(r, 100))
      const gone = await query('SELECT 1').catch((e) => e)
      expect(driver.isFatal!(conn, gone)).toBe(true)
      session.setRollbackOnly()
    })
  })

  it("poolStats() reports the pg pool's own figures", async () => {
    await scope.run(async () => {
      await query('SELECT 1')
      expect(scope.stats().pool).toEqual({
        total: pool.totalCount,
        idle: pool.idleCount,
        waiting: 0,
        max: 3,
      })
      expect(pool.totalCount - pool.idleCount).toBe(1)
    })
  })

  it('a job timeout cancels the running statement on the server (57014), it does not wait for it', async () => {
    // Checkout and BEGIN first, so that on a loaded machine the timeout still lands inside the
    // sleep (a timeout before the statement started would have nothing to cancel).
    const err = await scope
      .runJob(
        async () => {
          await query('SELECT 1')
          return query('SELECT pg_sleep(30)')
        },
        { name: 'slow', timeoutMs: 1_000 },
      )
      .catch((e) => e)
    // The job rejects as timed out; what the statement got is the cause: cancelled by the server.
    expect(err).toBeInstanceOf(ScopeAbortedError)
    expect(err.kind).toBe('timeout')
    expect(err.cause.code).toBe('57014')
    // The connection goes back once the cancel request itself is done (a cancel still in flight
    // could hit the next holder's statement), which may be a moment after the job rejected.
    await vi.waitFor(() => expect(pool.totalCount - pool.idleCount).toBe(0))
  })
})

describe('destroying a connection', () => {
  async function backendAlive(pid: number): Promise<boolean> {
    const rows = await independentQuery(url, 'SELECT 1 FROM pg_stat_activity WHERE pid = $1', [pid])
    return rows.length > 0
  }

  async function eventually(check: () => Promise<boolean>): Promise<boolean> {
    for (let i = 0; i < 100; i++) {
      if (await check()) return true
      await new Promise((r) => setTimeout(r, 20))
    }
    return false
  }

  it('with the pool: a connection taken by force (maxHoldMs) is closed, never handed out again', async () => {
    const own = new pg.Pool({ connectionString: url, max: 2 })
    const forced = createScope({
      driver: kyselyDriver(new PostgresDialect({ pool: own }), { pool: own }),
      default: false,
      maxHoldMs: 300,
      onError: () => {},
    })
    const db = scopedKysely<{ t: { v: string } }>(forced)
    let pid = 0
    const err = await forced
      .runJob(async () => {
        const { rows } = await db.executeQuery<{ pid: number }>(
          CompiledQuery.raw('SELECT pg_backend_pid() AS pid'),
        )
        pid = rows[0]!.pid
        await db.insertInto('t').values({ v: 'forced' }).execute()
        await db.executeQuery(CompiledQuery.raw('SELECT pg_sleep(5)'))
      })
      .catch((e) => e)
    expect(err).toBeInstanceOf(Error)
    expect(await eventually(async () => !(await backendAlive(pid)))).toBe(true)
    expect(own.totalCount).toBe(0)
    expect(await values()).toEqual([])
    await forced.close()
  })

  it('without the pool (the limit of a Kysely driver): it is rolled back and handed back to the dialect’s pool', async () => {
    const own = new pg.Pool({ connectionString: url, max: 2, application_name: `${app}_nopool` })
    const forced = createScope({
      driver: kyselyDriver(new PostgresDialect({ pool: own })),
      default: false,
      maxHoldMs: 300,
      onError: () => {},
    })
    const db = scopedKysely<{ t: { v: string } }>(forced)
    const err = await forced
      .runJob(async () => {
        await db.insertInto('t').values({ v: 'forced' }).execute()
        await db.executeQuery(CompiledQuery.raw('SELECT pg_sleep(1)'))
      })
      .catch((e) => e)
    expect(err).toBeInstanceOf(Error)
    // The rollback waits for the statement to end; then the connection is back, clean.
    expect(await eventually(async () => own.totalCount === 1 && own.idleCount === 1)).toBe(true)
    const states = await independentQuery(
      url,
      'SELECT state FROM pg_stat_activity WHERE application_name = $1',
      [`${app}_nopool`],
    )
    expect(states).toEqual([{ state: 'idle' }])
    expect(await values()).toEqual([])
    await forced.close()
  })
})

describe('options', () => {
  it('the pool must be the one the dialect uses', async () => {
    const other = new pg.Pool({ connectionString: url, max: 1 })
    const own = new pg.Pool({ connectionString: url, max: 1 })
    const wrong = createScope({
      driver: kyselyDriver(new PostgresDialect({ pool: own }), { pool: other }),
      default: false,
    })
    const err = await wrong.run(async () => wrong.getSession().connection()).catch((e) => e)
    expect(err).toBeInstanceOf(TypeError)
    expect(err.message).toContain('pass the same pg.Pool instance')
    expect(own.totalCount - own.idleCount).toBe(0)
    await wrong.close()
    await other.end()
  })

  it('wrong options are TypeErrors that name the option', () => {
    const dialect = new PostgresDialect({ pool })
    expect(() => kyselyDriver(dialect, { pol: pool } as never)).toThrow(
      'kyselyDriver(dialect, { pol }): unknown option',
    )
    expect(() => kyselyDriver({} as never)).toThrow('expected a Kysely Dialect')
    expect(() => kyselyDriver(dialect, { pool: {} as never })).toThrow('expected the pg.Pool')
    const sqlite = new SqliteDialect({ database: async () => ({}) as never })
    expect(() => kyselyDriver(sqlite, { pool })).toThrow('pool is for PostgresDialect')
    expect(() => kyselyDriver(dialect, { isFatal: 1 as never })).toThrow('{ isFatal }')
    expect(() => scopedKysely(scope, { outsideScope: 'maybe' as never })).toThrow(
      "expected 'throw' or 'pool'",
    )
    expect(() => scopedKysely(scope, { dialekt: dialect } as never)).toThrow(
      '{ dialekt }): unknown option',
    )
    const other = createScope({
      driver: { name: 'fake', acquire: async () => ({}), release() {} },
      transaction: 'none',
      default: false,
    })
    expect(() => scopedKysely(other as never)).toThrow(
      "the scope's driver is 'fake', not a kyselyDriver",
    )
  })
})
