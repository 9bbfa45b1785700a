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
      pool: () => poolFigures(orm),
      close: () => scope.close(),
    }
  },
}

describe('MikroORM driver', () => ormSuite(harness))
