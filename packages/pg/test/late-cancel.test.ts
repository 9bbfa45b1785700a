/**
 * A cancel that arrives late must not hit the next holder of the connection.
 *
 * PostgreSQL's CancelRequest goes on a connection of its own and cancels
 * whatever the backend runs when it lands. If the statement it was sent for
 * already ended, and the client was released and checked out again, the late
 * cancel killed the next request's statement (57014) — seen 5 times in the
 * 100,000-request reliability soak. Here a proxy delays every CancelRequest by
 * 300 ms, so "late" is certain: the driver must hold the client back until its
 * cancel is done.
 */
import { createScope } from '@scoped/core'
import { pgDriver, scopedPool } from '@scoped/pg'
import pg from 'pg'
import { afterAll, beforeAll, expect, it } from 'vitest'
import {
  type CancelDelayingProxy,
  cancelDelayingProxy,
} from '../../../test/support/cancel-proxy.ts'
import { testDatabase } from '../../../test/support/db.ts'

const CANCEL_DELAY_MS = 300
let proxy: CancelDelayingProxy
let proxyUrl: string

beforeAll(async () => {
  proxy = await cancelDelayingProxy(await testDatabase('pg_late_cancel'), CANCEL_DELAY_MS)
  proxyUrl = proxy.url
})

afterAll(() => proxy.close())

it('the connection goes to the next holder only after the cancel sent for the previous one is done', async () => {
  // One connection, so the next scope gets the very backend the cancel was sent to.
  const pool = new pg.Pool({ connectionString: proxyUrl, max: 1 })
  const scope = createScope({ driver: pgDriver(pool), name: 'late-cancel', default: false })
  const db = scopedPool(scope)
  try {
    // A request aborted (with cancel) while its short statement runs: the statement ends on its
    // own long before the cancel arrives.
    const open = scope.open({ name: 'aborted', kind: 'request' })
    const first = await open.enter(async () => {
      await db.query('SELECT 1') // checked out and in its transaction: the next statement runs at once
      const running = db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid, pg_sleep(0.05)')
      await new Promise((r) => setTimeout(r, 10))
      open.abort('client-abort', { cancel: true })
      return (await running).rows[0]!.pid
    })
    await open.end({ commit: false })

    // The next holder runs a statement that spans the moment the late cancel lands.
    const second = await scope.run(async () => {
      const { rows } = await db.query<{ pid: number }>(
        'SELECT pg_backend_pid() AS pid, pg_sleep(0.5)',
      )
      return rows[0]!.pid
    })
    expect(second).toBe(first)
    expect(pool.totalCount).toBe(pool.idleCount)
  } finally {
    await scope.close()
  }
})
