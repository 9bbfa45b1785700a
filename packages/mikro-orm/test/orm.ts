import { MikroORM } from '@mikro-orm/postgresql'
import { NoteSchema } from './note.ts'

/** A MikroORM over `url` with a pool of `max`, whose backends carry `applicationName`. */
export function initOrm(url: string, max: number, applicationName: string): Promise<MikroORM> {
  return MikroORM.init({
    clientUrl: url,
    entities: [NoteSchema],
    pool: { min: 0, max },
    driverOptions: { connection: { application_name: applicationName } },
    discovery: { warnWhenNoEntities: false },
    debug: false,
  })
}

/** The knex (tarn) pool's figures, in the suite's shape. */
export function poolFigures(orm: MikroORM): { total: number; idle: number; waiting: number } {
  const pool = (orm.em.getConnection('write').getKnex() as any).client.pool
  return {
    total: pool.numUsed() + pool.numFree() + pool.numPendingCreates(),
    idle: pool.numFree(),
    waiting: pool.numPendingAcquires(),
  }
}
