/**
 * pgDriver's own guarantees, called directly (no scope) against a real
 * PostgreSQL: COMMIT that PostgreSQL turned into ROLLBACK is an error; a
 * COMMIT on a connection that already died says so; a client released inside
 * a transaction is destroyed, never handed to the next caller; isFatal and
 * isRetryable classify the errors PostgreSQL really sends.
 */
import { TransactionStateError } from '@scoped/core'
import { isFatalPgError, isRetryablePgError, pgDriver } from '@scoped/pg'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'

let url: string
let pool: pg.Pool
let driver: ReturnType<typeof pgDriver>
const app = `pg_driver_${process.pid}`
const never = new AbortController().signal
const info = { id: 't1', name: 'driver-test' }

beforeAll(async () => {
  url = await testDatabase('pg_driver')
  await independentQuery(url, 'CREATE TABLE t (v text UNIQUE)')
  pool = new pg.Pool({ connectionString: url, application_name: app, max: 2 })
  driver = pgDriver(pool, { validateIdleMs: 0 })
})

afterAll(async () => {
  await driver.end?.()
})

/** Wait until backend `pid` is running pg_sleep, so a cancel or terminate hits the statement. */
async function sleepingOn(pid: number): Promise<void> {
  for (let i = 0; i < 500; i++) {
    const active = await independentQuery(
      url,
      "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active' AND query LIKE '%pg_sleep%'",
      [pid],
    )
    if (active.length > 0) return
    await new Promise((r) => setTimeout(r, 10))
  }
  throw new Error(`backend ${pid} never started its pg_sleep`)
}

const rows = async () => (await independentQuery(url, 'SELECT v FROM t ORDER BY v')).map((r) => r.v)

describe('pgDriver', () => {
  it('commit() rejects with TransactionStateError when PostgreSQL answers COMMIT with ROLLBACK', async () => {
    const c = await driver.acquire(never)
    try {
      await driver.begin!(c, {}, info)
      await c.query("INSERT INTO t VALUES ('a')")
      await expect(c.query("INSERT INTO t VALUES ('a')")).rejects.toMatchObject({ code: '23505' })
      const err = await driver.commit!(c).catch((e) => e)
      expect(err).toBeInstanceOf(TransactionStateError)
      expect(err.message).toContain('COMMIT was turned into ROLLBACK')
      // The transaction is over (the server ended it), so the client is reusable.
      expect(c.getTransactionStatus?.()).toBe('I')
    } finally {
      driver.release(c, { destroy: false })
    }
    expect(await rows()).toEqual([])
  })

  it('commit() of a healthy transaction commits', async () => {
    const c = await driver.acquire(never)
    try {
      await driver.begin!(c, { isolation: 'repeatable read', readOnly: false }, info)
      await c.query("INSERT INTO t VALUES ('committed')")
      await driver.commit!(c)
    } finally {
      driver.release(c, { destroy: false })
    }
    expect(await rows()).toContain('committed')
    await independentQuery(url, 'TRUNCATE t')
  })

  it('commit() on a connection whose backend died says why, and that nothing was committed', async () => {
    const c = await driver.acquire(never)
    await driver.begin!(c, {}, info)
    await c.query("INSERT INTO t VALUES ('lost')")
    const pid = (await c.query('SELECT pg_backend_pid() AS pid')).rows[0].pid
    const errored = new Promise((r) => c.once('error', r))
    await independentQuery(url, 'SELECT pg_terminate_backend($1)', [pid])
    await errored
    const err = await driver.commit!(c).catch((e) => e)
    expect(err).toBeInstanceOf(TransactionStateError)
    expect(err.message).toContain('COMMIT was not sent')
    expect(err.message).toContain('terminating connection due to administrator command')
    expect(driver.isFatal!(c, err)).toBe(true)
    const total = pool.totalCount
    driver.release(c, { destroy: true, error: err })
    expect(pool.totalCount).toBe(total - 1)
    expect(await rows()).toEqual([])
  })

  it('release() destroys a client still inside a transaction, even when asked to return it', async () => {
    const c = await driver.acquire(never)
    await c.query('BEGIN')
    await c.query("INSERT INTO t VALUES ('half-done')")
    const pid = (await c.query('SELECT pg_backend_pid() AS pid')).rows[0].pid
    const total = pool.totalCount
    driver.release(c, { destroy: false })
    expect(pool.totalCount).toBe(total - 1)
    // The backend goes away with its open transaction; nothing is left idle in transaction.
    for (let i = 0; i < 100; i++) {
      const left = await independentQuery(
        url,
        'SELECT state FROM pg_stat_activity WHERE pid = $1',
        [pid],
      )
      if (left.length === 0) break
      await new Promise((r) => setTimeout(r, 10))
    }
    expect(
      await independentQuery(url, 'SELECT 1 FROM pg_stat_activity WHERE pid = $1', [pid]),
    ).toEqual([])
    expect(await rows()).toEqual([])
  })

  it('savepoints: rollbackToSavepoint undoes only what followed the savepoint', async () => {
    const c = await driver.acquire(never)
    try {
      await driver.begin!(c, {}, info)
      await c.query("INSERT INTO t VALUES ('kept')")
      await driver.savepoint!(c, 'scoped_sp_1')
      await c.query("INSERT INTO t VALUES ('undone')")
      await driver.rollbackToSavepoint!(c, 'scoped_sp_1')
      await driver.savepoint!(c, 'scoped_sp_2')
      await c.query("INSERT INTO t VALUES ('released')")
      await driver.releaseSavepoint!(c, 'scoped_sp_2')
      await driver.commit!(c)
    } finally {
      driver.release(c, { destroy: false })
    }
    expect(await rows()).toEqual(['kept', 'released'])
    await independentQuery(url, 'TRUNCATE t')
  })

  it('cancel() stops the running statement and leaves the connection usable', async () => {
    const c = await driver.acquire(never)
    try {
      const pid = (await c.query('SELECT pg_backend_pid() AS pid')).rows[0].pid
      const sleeping = c.query('SELECT pg_sleep(30)')
      sleeping.catch(() => {})
      await sleepingOn(pid)
      await driver.cancel!(c)
      await expect(sleeping).rejects.toMatchObject({ code: '57014' })
      expect(driver.isFatal!(c, await sleeping.catch((e) => e))).toBe(false)
      expect((await c.query('SELECT 1 AS one')).rows[0].one).toBe(1)
    } finally {
      driver.release(c, { destroy: false })
    }
  })

  it('poolStats() reports the pool', async () => {
    const c = await driver.acquire(never)
    try {
      expect(driver.poolStats!()).toMatchObject({ max: 2, waiting: 0 })
      expect(driver.poolStats!().total - driver.poolStats!().idle).toBe(1)
    } finally {
      driver.release(c, { destroy: false })
    }
  })
})

describe('error classification on real server errors', () => {
  it('isRetryablePgError: 40001 and 40P01 yes; a constraint violation no', async () => {
    const c = new pg.Client({ connectionString: url })
    await c.connect()
    try {
      const raise = (state: string) =>
        c
          .query(`DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '${state}'; END $$`)
          .catch((e) => e)
      expect(isRetryablePgError(await raise('40001'))).toBe(true)
      expect(isRetryablePgError(await raise('40P01'))).toBe(true)
      expect(isRetryablePgError(await raise('23505'))).toBe(false)
      expect(isFatalPgError(await raise('23505'))).toBe(false)
      expect(isFatalPgError(await c.query('SELECT 1 / 0').catch((e) => e))).toBe(false)
    } finally {
      await c.end()
    }
  })

  it('isFatalPgError: a terminated backend, and a client that can no longer be queried', async () => {
    const c = new pg.Client({ connectionString: url })
    c.on('error', () => {})
    await c.connect()
    const pid = (await c.query('SELECT pg_backend_pid() AS pid')).rows[0].pid
    const sleeping = c.query('SELECT pg_sleep(30)').catch((e) => e)
    await sleepingOn(pid)
    await independentQuery(url, 'SELECT pg_terminate_backend($1)', [pid])
    const terminated = await sleeping
    expect(terminated).toMatchObject({ code: '57P01' })
    expect(isFatalPgError(terminated)).toBe(true)
    const after = await c.query('SELECT 1').catch((e) => e)
    expect(isFatalPgError(after)).toBe(true)
  })
})
