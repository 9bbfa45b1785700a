/**
 * The ORM suite (test/orm/suite.ts) with MikroORM: writes go through the
 * session's forked EntityManager (`em.create()` + `em.flush()`).
 */
import { createScope } from '@scoped/core'
import { currentEntityManager, mikroOrmDriver } from '@scoped/mikro-orm'
import { describe } from 'vitest'
import { type OrmHarness, ormSuite } from '../../../test/orm/suite.ts'
import { NoteSchema } from './note.ts'
import { initOrm, poolFigures } from './orm.ts'

const harness: OrmHarness = {
  name: 'mikro_orm',
  async fixture(url, { max, applicationName }) {
    const orm = await initOrm(url, max, applicationName)
    const scope = createScope({ driver: mikroOrmDriver(orm), name: 'mikro-orm', default: false })
    return {
      scope,
      insert: async (v) => {
        const em = await currentEntityManager(scope)
        em.create(NoteSchema, { v })
        await em.flush()
      },
      failingStatement: async () => (await currentEntityManager(scope)).execute('SELECT 1 / 0'),
      // A tracked use: the session knows a statement runs, so an abort can cancel it (a statement
      // through currentEntityManager() is not tracked, and is never cancelled).
      pidAndSleep: async (seconds) => {
        const rows = await scope
          .getSession()
          .use((em) => em.execute('SELECT pg_backend_pid() AS pid, pg_sleep(?)', [seconds]))
        return rows[0]!.pid
      },
      pool: () => poolFigures(orm),
      close: () => scope.close(),
    }
  },
}

describe('MikroORM driver', () => ormSuite(harness))
