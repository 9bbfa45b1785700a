/**
 * The ORM suite (test/orm/suite.ts) with Drizzle: writes go through
 * `scopedDrizzle(scope)`, Drizzle's own query builder.
 */
import { createScope } from '@scoped/core'
import { scopedDrizzle } from '@scoped/drizzle'
import { pgDriver } from '@scoped/pg'
import { sql } from 'drizzle-orm'
import pg from 'pg'
import { describe } from 'vitest'
import { type OrmHarness, ormSuite } from '../../../test/orm/suite.ts'
import { notes } from './schema.ts'

const harness: OrmHarness = {
  name: 'drizzle',
  async fixture(url, { max, applicationName }) {
    const pool = new pg.Pool({ connectionString: url, max, application_name: applicationName })
    const scope = createScope({ driver: pgDriver(pool), name: 'drizzle', default: false })
    const db = scopedDrizzle(scope)
    return {
      scope,
      insert: async (v) => {
        await db.insert(notes).values({ v })
      },
      failingStatement: () => db.execute(sql`SELECT 1 / 0`),
      pidAndSleep: async (seconds) => {
        const { rows } = await db.execute<{ pid: number }>(
          sql`SELECT pg_backend_pid() AS pid, pg_sleep(${seconds})`,
        )
        return rows[0]!.pid
      },
      pool: () => ({ total: pool.totalCount, idle: pool.idleCount, waiting: pool.waitingCount }),
      close: () => scope.close(),
    }
  },
}

describe('Drizzle (node-postgres) over pgDriver', () => ormSuite(harness))
