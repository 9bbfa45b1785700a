/**
 * pgDriver's session settings against a real PostgreSQL: statementTimeoutMs
 * and applicationName are applied with SET LOCAL at BEGIN, so they hold for
 * the unit of work (as the session itself and an independent observer of
 * pg_stat_activity see) and are gone from the backend when it ends: the next
 * user of the pooled connection, or PgBouncer's next client, never inherits them.
 */
import { createScope } from '@scoped/core'
import { pgDriver } from '@scoped/pg'
import pg from 'pg'
import { afterEach, beforeAll, describe, expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'

let url: string
const cleanup: (() => Promise<void>)[] = []

beforeAll(async () => {
  url = await testDatabase('pg_session_settings')
  await independentQuery(url, 'CREATE TABLE t (v text)')
})

afterEach(async () => {
  for (const fn of cleanup.splice(0)) await fn()
})

let n = 0
function setup(options: Parameters<typeof pgDriver>[1]) {
  const app = `pg_settings_${process.pid}_${++n}`
  // One connection, so "the same backend after the unit of work" is the next scope's backend.
  const pool = new pg.Pool({ connectionString: url, application_name: app, max: 1 })
  const scope = createScope({ driver: pgDriver(pool, options), default: false, name: 'settings' })
  cleanup.push(() => scope.close())
  return { app, pool, scope }
}

interface Seen {
  pid: number
  timeout: string
  app: string
  observed: string
}

/** What the session sees (SHOW) and what an independent connection sees (pg_stat_activity). */
async function look(scope: ReturnType<typeof setup>['scope']): Promise<Seen> {
  return scope.getSession().use(async (c) => {
    const { rows } = await c.query<{ pid: number; timeout: string; app: string }>(
      "SELECT pg_backend_pid() AS pid, current_setting('statement_timeout') AS timeout, current_setting('application_name') AS app",
    )
    const { pid, timeout, app } = rows[0]!
    const observed = await independentQuery<{ application_name: string }>(
      url,
      'SELECT application_name FROM pg_stat_activity WHERE pid = $1',
      [pid],
    )
    return { pid, timeout, app, observed: observed[0]!.application_name }
  })
}

describe('pgDriver session settings', () => {
  it('statementTimeoutMs and applicationName hold inside the unit of work and are gone after it', async () => {
    const { app, scope } = setup({ statementTimeoutMs: 1234, applicationName: 'billing-api' })
    const inside = await scope.run(() => look(scope), { name: 'GET /invoices' })
    expect(inside).toMatchObject({ timeout: '1234ms', app: 'billing-api', observed: 'billing-api' })

    // Same backend, no transaction (so no SET LOCAL): the pool's own settings are back.
    const after = await scope.run(() => look(scope), { transaction: 'none' })
    expect(after.pid).toBe(inside.pid)
    expect(after).toMatchObject({ timeout: '0', app, observed: app })

    // And an observer sees the idle backend under the pool's name again.
    const idle = await independentQuery(
      url,
      'SELECT application_name, state FROM pg_stat_activity WHERE pid = $1',
      [inside.pid],
    )
    expect(idle).toEqual([{ application_name: app, state: 'idle' }])
  })

  it("applicationName 'auto' is the session's name, quoted safely and cut to 63 bytes", async () => {
    const { app, scope } = setup({ applicationName: 'auto' })
    const seen = await scope.run(() => look(scope), { name: "GET /users/o'brien" })
    expect(seen.app).toBe("GET /users/o'brien")
    expect(seen.observed).toBe("GET /users/o'brien")

    const job = await scope.runJob(() => look(scope), { name: 'nightly-export' })
    expect(job.observed).toBe('job:nightly-export')

    const long = 'GET /' + 'x'.repeat(100)
    const cut = await scope.run(() => look(scope), { name: long })
    expect(cut.app).toBe(long.slice(0, 63))

    const after = await scope.run(() => look(scope), { transaction: 'none' })
    expect(after.observed).toBe(app)
  })

  it('a new transaction after an explicit commit() gets the settings again', async () => {
    const { scope } = setup({ statementTimeoutMs: 777 })
    const [first, second] = await scope.run(async () => {
      const a = await look(scope)
      await scope.getSession().commit()
      const b = await look(scope)
      return [a, b]
    })
    expect(first!.timeout).toBe('777ms')
    expect(second!.timeout).toBe('777ms')
  })

  it('statementTimeoutMs stops a slow statement; the unit of work rolls back, the connection is reused', async () => {
    const { pool, scope } = setup({ statementTimeoutMs: 100 })
    const err = await scope
      .run(async () => {
        await scope.getSession().use((c) => c.query("INSERT INTO t VALUES ('slow')"))
        await scope.getSession().use((c) => c.query('SELECT pg_sleep(5)'))
      })
      .catch((e) => e)
    expect(err).toMatchObject({ code: '57014' }) // query_canceled: statement timeout
    expect(await independentQuery(url, "SELECT v FROM t WHERE v = 'slow'")).toEqual([])
    expect(scope.stats().totals.destroyed).toBe(0)
    expect(pool.totalCount).toBe(1)
    expect(pool.idleCount).toBe(1)
  })

  it("with transaction: 'none' the settings apply inside transaction(fn) only (there is no other transaction to SET LOCAL in)", async () => {
    const { app, scope } = setup({ statementTimeoutMs: 500, applicationName: 'auto' })
    const [autocommit, inTx] = await scope.run(
      async () => [await look(scope), await scope.getSession().transaction(() => look(scope))],
      { transaction: 'none', name: 'job:batch' },
    )
    expect(autocommit).toMatchObject({ timeout: '0', observed: app })
    expect(inTx).toMatchObject({ timeout: '500ms', observed: 'job:batch' })
  })
})
