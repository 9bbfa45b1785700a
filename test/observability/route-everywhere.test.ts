/**
 * "Who holds the connections?" has one answer everywhere (design problem 4).
 * While a request-like scope sleeps in PostgreSQL on a max:1 pool, the route
 * name is what `scope.holders()`, the holders page, the `PoolTimeoutError` of
 * a second request, the leak warning, the `scoped:leak` event and
 * `pg_stat_activity.application_name` (seen from an independent connection)
 * all show.
 */
import dc from 'node:diagnostics_channel'
import { channels, createScope, type LeakMessage, PoolTimeoutError } from '@scoped/core'
import { pgDriver, scopedPool } from '@scoped/pg'
import { beforeAll, describe, expect, it } from 'vitest'
import { holdersPage } from '../../packages/core/src/page/index.ts'
import {
  expectNoIdleInTransaction,
  expectPoolSettled,
  memoryLogger,
  testPool,
  waitFor,
} from '../foundation/support.ts'
import { independentQuery, testDatabase } from '../support/db.ts'

const ROUTE = 'GET /orders/:id'
let url: string

beforeAll(async () => {
  url = await testDatabase('observability_route')
  await independentQuery(url, 'CREATE TABLE gate (opened boolean)')
})

/**
 * Sleeps in the database (pg_sleep, in a loop) until the test opens the gate,
 * so the checks below never race a fixed sleep. Each statement of the loop
 * takes a new snapshot (READ COMMITTED), so it sees the gate row once committed.
 */
const SLEEP_UNTIL_GATE = `DO $$ BEGIN
  WHILE NOT EXISTS (SELECT 1 FROM gate) LOOP PERFORM pg_sleep(0.02); END LOOP;
END $$`

describe('the route names the holder everywhere', () => {
  it('holders(), the page, PoolTimeoutError, the leak warning and pg_stat_activity', async () => {
    const { pool, app } = testPool(url, 'route', { max: 1 })
    const logger = memoryLogger()
    const scope = createScope({
      driver: pgDriver(pool, { applicationName: 'auto' }),
      name: 'orders-db',
      default: false,
      acquireTimeoutMs: 300,
      leakDetectionMs: 100,
      captureStacks: true,
      logger,
    })
    const db = scopedPool(scope)
    const page = holdersPage(scope)
    const leaks: LeakMessage[] = []
    const onLeak = (m: unknown) => {
      leaks.push(m as LeakMessage)
    }
    dc.subscribe(channels.leak.name as string, onLeak)
    try {
      // The "request": what an adapter does for GET /orders/42.
      const request = scope.run(
        async () => {
          await db.query(SLEEP_UNTIL_GATE)
          const { rows } = await db.query('SELECT current_setting($1) AS app', ['application_name'])
          return rows[0].app as string
        },
        { name: ROUTE, requestId: 'req-42' },
      )
      await waitFor(
        'the request to be in the database',
        () => scope.holders()[0]?.state === 'querying',
      )

      // 1. holders()
      const [holder, ...others] = scope.holders()
      expect(others).toEqual([])
      expect(holder).toMatchObject({ name: ROUTE, requestId: 'req-42', state: 'querying' })
      expect(holder!.site).toContain('route-everywhere.test.ts')

      // 2. pg_stat_activity, from a connection of its own
      const activity = await independentQuery<{ application_name: string; state: string }>(
        url,
        `SELECT application_name, state FROM pg_stat_activity
          WHERE datname = current_database() AND query LIKE 'DO $$%gate%' AND pid <> pg_backend_pid()`,
      )
      expect(activity).toEqual([{ application_name: ROUTE, state: 'active' }])

      // 3. the page
      const html = page.html()
      expect(html).toMatch(
        /<td>GET \/orders\/:id<\/td><td><code>req-42<\/code><\/td><td class="num">[^<]+<\/td><td class="state-querying">querying<\/td><td><details><summary><code>[^<]*route-everywhere\.test\.ts/,
      )
      expect(html).toContain('<b>1</b> of 1 in use')

      // 4. a second request waits for the only connection, gives up, and says who has it
      const err = await scope
        .run(async () => db.query('SELECT 1'), { name: 'GET /health' })
        .catch((e: unknown) => e)
      expect(err).toBeInstanceOf(PoolTimeoutError)
      const message = (err as Error).message
      expect(message).toContain("Session 'GET /health' waited 300 ms")
      expect(message).toContain("pool 'orders-db': 1/1 in use")
      expect(message).toMatch(
        /- 'GET \/orders\/:id' \(\w+\) held \d+ ms, querying, acquired at .*route-everywhere\.test\.ts/,
      )

      // 5. the leak warning (leakDetectionMs: 100 passed while we waited) and its event
      await waitFor('the leak warning', () => logger.warnings.length > 0)
      expect(logger.warnings).toHaveLength(1)
      expect(logger.warnings[0]).toMatch(
        /Possible connection leak: session 'GET \/orders\/:id' \(\w+, request req-42\) of scope 'orders-db'.*state querying\.\nAcquired at:\n.*route-everywhere\.test\.ts/s,
      )
      expect(leaks.map((l) => [l.holder.name, l.holder.requestId])).toEqual([[ROUTE, 'req-42']])

      // Let the request finish: it commits, and inside its transaction it was named by the route.
      await independentQuery(url, 'INSERT INTO gate VALUES (true)')
      expect(await request).toBe(ROUTE)
      expect(scope.holders()).toEqual([])
      expect(scope.stats().totals).toMatchObject({ committed: 1, timeouts: 1, leaks: 1 })
      await waitFor('the abandoned checkout to go back', () => pool.waitingCount === 0)
      expectPoolSettled(pool)
      await expectNoIdleInTransaction(url, app)
      // Outside a transaction the backend is back to the pool's own name: SET LOCAL did not leak.
      const after = await independentQuery<{ application_name: string }>(
        url,
        'SELECT application_name FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()',
      )
      expect(after.map((r) => r.application_name)).not.toContain(ROUTE)
    } finally {
      dc.unsubscribe(channels.leak.name as string, onLeak)
      page.stop()
      await scope.close() // ends the pool too
    }
  })
})
