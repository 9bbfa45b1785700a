/**
 * A session whose connection is left inside a transaction the core did not
 * open (a raw `begin` sent through `db` or `db.connection()` in autocommit
 * mode, never committed) must not hand that connection to the pool: the next
 * holder's statements would run inside the stale transaction and be lost when
 * it is rolled back. With `{ pool }` the driver sees the pg client's
 * transaction status and destroys such a connection, as pgDriver does.
 */
import { createScope } from '@scoped/core'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import { type Generated, PostgresDialect, sql } from 'kysely'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'

interface DB {
  items: { id: Generated<number>; v: string }
}

let url: string
const scopes: { close(): Promise<void> }[] = []

beforeAll(async () => {
  url = await testDatabase('kysely_open_tx_release')
  await independentQuery(url, 'CREATE TABLE items (id serial PRIMARY KEY, v text NOT NULL)')
})

afterAll(async () => {
  await Promise.all(scopes.map((s) => s.close()))
})

describe.each(['end', 'idle'] as const)(
  "a connection left in a transaction (transaction: 'none', release: '%s')",
  (release) => {
    it('is destroyed, and the next request on the pool commits its write', async () => {
      await independentQuery(url, 'TRUNCATE items')
      // One connection: the next request gets the very client the first one left behind.
      const pool = new pg.Pool({ connectionString: url, max: 1 })
      const dialect = new PostgresDialect({ pool })
      const scope = createScope({
        driver: kyselyDriver(dialect, { pool }),
        default: false,
        name: `open-tx-${release}`,
        transaction: 'none',
        release,
      })
      scopes.push(scope)
      const db = scopedKysely<DB>(scope)
      let removed = 0
      pool.on('remove', () => removed++)
      await scope
        .run(async () => {
          await db.connection().execute(async (c) => {
            await sql`begin`.execute(c)
            // One connection for the whole handle, even with release: 'idle'.
            await c.insertInto('items').values({ v: 'a, never committed' }).execute()
            throw new Error('handler failed before its COMMIT')
          })
        })
        .catch(() => {})
      await scope.run(() => db.insertInto('items').values({ v: 'b' }).execute())
      const rows = await independentQuery(url, 'SELECT v FROM items ORDER BY id')
      expect(rows.map((r) => r.v)).toEqual(['b'])
      expect(removed).toBe(1)
      expect(pool.totalCount).toBe(pool.idleCount)
    })
  },
)
