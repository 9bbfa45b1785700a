/**
 * kyselyDriver with the dialect's pg.Pool cancels a running statement on
 * abort. A CancelRequest lands whenever it lands: if it arrives after the
 * statement it was sent for ended, and the connection already went to its
 * next holder, it cancels that holder's statement. A proxy holds every
 * CancelRequest back by 300 ms, so "late" is certain; the driver must keep
 * the connection until its cancel is done (as pgDriver does).
 */
import { createScope } from '@scoped/core'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import { PostgresDialect, sql } from 'kysely'
import pg from 'pg'
import { afterAll, beforeAll, expect, it } from 'vitest'
import {
  type CancelDelayingProxy,
  cancelDelayingProxy,
} from '../../../test/support/cancel-proxy.ts'
import { testDatabase } from '../../../test/support/db.ts'

let proxy: CancelDelayingProxy

beforeAll(async () => {
  proxy = await cancelDelayingProxy(await testDatabase('kysely_late_cancel'), 300)
})

afterAll(() => proxy.close())

it('the connection goes to the next holder only after the cancel sent for the previous one is done', async () => {
  // One connection, so the next scope gets the very backend the cancel was sent to.
  const pool = new pg.Pool({ connectionString: proxy.url, max: 1 })
  const dialect = new PostgresDialect({ pool })
  const scope = createScope({
    driver: kyselyDriver(dialect, { pool }),
    name: 'kysely-late-cancel',
    default: false,
  })
  const db = scopedKysely(scope)
  const pidAndSleep = (seconds: number) =>
    sql<{ pid: number }>`SELECT pg_backend_pid() AS pid, pg_sleep(${seconds})`.execute(db)
  try {
    // A request aborted (with cancel) while its short statement runs: the statement ends on its
    // own long before the cancel arrives.
    const open = scope.open({ name: 'aborted', kind: 'request' })
    const first = await open.enter(async () => {
      await sql`SELECT 1`.execute(db) // checked out and in its transaction
      const running = pidAndSleep(0.05)
      await new Promise((r) => setTimeout(r, 10))
      open.abort('client-abort', { cancel: true })
      return (await running).rows[0]!.pid
    })
    await open.end({ commit: false })

    // The next holder runs a statement that spans the moment the late cancel lands.
    const second = await scope.run(async () => (await pidAndSleep(0.5)).rows[0]!.pid)
    expect(second).toBe(first)
    expect(pool.totalCount).toBe(pool.idleCount)
  } finally {
    await scope.close()
  }
})
