/**
 * The ORM suite (test/orm/suite.ts) with TypeORM: writes go through
 * `scopedManager(scope)`, TypeORM's own EntityManager API.
 */
import { createScope } from '@scoped/core'
import { scopedManager, typeormDriver } from '@scoped/typeorm'
import { DataSource } from 'typeorm'
import { describe } from 'vitest'
import { type OrmHarness, ormSuite } from '../../../test/orm/suite.ts'
import { NoteSchema } from './note.ts'

const harness: OrmHarness = {
  name: 'typeorm',
  async fixture(url, { max, applicationName }) {
    const dataSource = await new DataSource({
      type: 'postgres',
      url,
      entities: [NoteSchema],
      poolSize: max,
      applicationName,
    }).initialize()
    const scope = createScope({
      driver: typeormDriver(dataSource),
      name: 'typeorm',
      default: false,
    })
    const db = scopedManager(scope)
    const pool = (dataSource.driver as unknown as { master: import('pg').Pool }).master
    return {
      scope,
      insert: async (v) => {
        await db.insert(NoteSchema, { v })
      },
      failingStatement: () => db.query('SELECT 1 / 0'),
      pidAndSleep: async (seconds) =>
        (await db.query('SELECT pg_backend_pid() AS pid, pg_sleep($1)', [seconds]))[0].pid,
      pool: () => ({ total: pool.totalCount, idle: pool.idleCount, waiting: pool.waitingCount }),
      close: () => scope.close(),
    }
  },
}

describe('TypeORM driver', () => ormSuite(harness))
