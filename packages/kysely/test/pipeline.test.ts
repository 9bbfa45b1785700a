/**
 * scopedKysely on a pg pool made with `pipeline: true` (node-postgres 8.23+),
 * given to kyselyDriver as `{ pool }`: the unit of work's BEGIN goes on the
 * wire together with its first statement, so a one-statement unit costs two
 * round trips instead of three — what plain Kysely's `db.transaction()`
 * cannot do, since it waits for BEGIN before it runs the callback. The unit is
 * still one transaction, and a failure behind the pipelined BEGIN reports the
 * real error, never the "current transaction is aborted" queued behind it.
 */
import { createScope } from '@scoped/core'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import { type Generated, PostgresDialect, sql } from 'kysely'
import pg from 'pg'
import { describe, expect, it } from 'vitest'
import { pipelineFixture } from '../../../test/support/wire.ts'

interface DB {
  items: { id: Generated<number>; v: string }
}

const f = pipelineFixture('kysely_pipeline')
const { wire, committed, settled } = f

function makeDb(config: pg.PoolConfig & { pipeline?: boolean } = {}, withPool = true) {
  const pool = f.pool(config)
  const dialect = new PostgresDialect({ pool })
  const scope = createScope({
    driver: kyselyDriver(dialect, withPool ? { pool } : {}),
    default: false,
    name: 'kysely-pipeline',
  })
  f.closeLater(scope)
  return { pool, scope, db: scopedKysely<DB>(scope) }
}

/** The unit's first exchange on the wire, from its BEGIN. */
const afterBegin = (n: number) => {
  const begin = wire.lastIndexOf('write BEGIN')
  return wire.slice(begin, begin + n)
}

describe("pipelined BEGIN through scopedKysely ('auto' on a pipeline: true pool)", () => {
  it('writes BEGIN and the first statement back to back, and commits the unit as one transaction', async () => {
    const { pool, scope, db } = makeDb()
    // The first checkout of a physical connection asks its backend pid: warm it up first.
    await scope.run(() => sql`SELECT 1`.execute(db))
    wire.length = 0
    const xids = await scope.run(async () => {
      const rows = [
        await db
          .insertInto('items')
          .values({ v: 'a' })
          .returning(sql<string>`txid_current()::text`.as('xid'))
          .executeTakeFirstOrThrow(),
      ]
      for (const v of ['b', 'c']) {
        rows.push(
          await db
            .insertInto('items')
            .values({ v })
            .returning(sql<string>`txid_current()::text`.as('xid'))
            .executeTakeFirstOrThrow(),
        )
      }
      return rows.map((r) => r.xid)
    })
    expect(afterBegin(2)).toEqual(['write BEGIN', 'write INSERT'])
    expect(wire).toContain('write COMMIT')
    expect(new Set(xids).size).toBe(1)
    expect(await committed()).toEqual(['a', 'b', 'c'])
    expect(scope.stats().totals).toMatchObject({ rolledBack: 0, destroyed: 0 })
    await settled(pool)
  })

  it('a unit that throws after its pipelined first statement rolls it back', async () => {
    const { pool, scope, db } = makeDb()
    await expect(
      scope.run(async () => {
        await db.insertInto('items').values({ v: 'gone' }).execute()
        throw new Error('handler failed')
      }),
    ).rejects.toThrow('handler failed')
    expect(await committed()).toEqual([])
    await settled(pool)
  })

  it('the first statement failing behind BEGIN reports its own error, and the connection stays usable', async () => {
    const { pool, scope, db } = makeDb()
    const error = await scope
      .run(() => sql`SELECT 1 / 0`.execute(db))
      .catch((e: unknown) => e as { code?: string; message: string })
    expect(error).toMatchObject({ code: '22012', message: 'division by zero' })
    await scope.run(() => db.insertInto('items').values({ v: 'after' }).execute())
    expect(await committed()).toEqual(['after'])
    expect(scope.stats().totals.destroyed).toBe(0)
    await settled(pool)
  })

  it('a BEGIN that fails on the server: the statement reports its error, the connection is destroyed', async () => {
    // The server rejects a setting sent with BEGIN: the transaction block is open but aborted,
    // and the statement pipelined behind it fails with 25P02.
    class FailingBegin extends pg.Client {
      override query(config: any, ...rest: any[]): any {
        if (typeof config === 'string' && config === 'begin') {
          config = `begin; SET LOCAL lock_timeout = 'forever'`
        }
        return (super.query as (...a: unknown[]) => unknown)(config, ...rest)
      }
    }
    const { pool, scope, db } = makeDb({ Client: FailingBegin } as pg.PoolConfig)
    await scope.run(() => sql`SELECT 1`.execute(db)).catch(() => {}) // learns the backend pid
    const destroyed = scope.stats().totals.destroyed
    const error = await scope
      .run(() => db.insertInto('items').values({ v: 'never' }).execute())
      .catch((e: unknown) => e as { code?: string; message: string })
    expect(error).toMatchObject({ code: '22023', message: expect.stringMatching(/lock_timeout/) })
    expect(await committed()).toEqual([])
    expect(scope.stats().totals.destroyed).toBeGreaterThan(destroyed)
    await settled(pool)
  })

  it('without { pool } the driver cannot see the pg client: BEGIN is answered before the statement is sent', async () => {
    const { pool, scope, db } = makeDb({}, false)
    await scope.run(() => db.insertInto('items').values({ v: 'x' }).execute())
    expect(afterBegin(3)).toEqual(['write BEGIN', 'read', 'write INSERT'])
    expect(await committed()).toEqual(['x'])
    await settled(pool)
  })
})
