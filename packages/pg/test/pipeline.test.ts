/**
 * A pool created with `pipeline: true` (node-postgres 8.23+): the unit of
 * work's BEGIN goes on the wire together with its first statement, so a
 * one-statement unit costs two round trips (BEGIN + statement, COMMIT) instead
 * of three. Against a real PostgreSQL: the unit is still one transaction that
 * commits or rolls back as a whole, and when something fails behind the
 * pipelined BEGIN the caller gets the real error, never the "current
 * transaction is aborted" of the statements queued behind it.
 */
import { createScope } from '@scoped/core'
import { pgDriver, scopedPool } from '@scoped/pg'
import pg from 'pg'
import { describe, expect, it } from 'vitest'
import { pipelineFixture } from '../../../test/support/wire.ts'

const f = pipelineFixture('pg_pipeline')
const { wire, committed, settled } = f

function makeScope(config: pg.PoolConfig & { pipeline?: boolean } = {}) {
  const pool = f.pool(config)
  const scope = createScope({ driver: pgDriver(pool), default: false, name: 'pipeline' })
  f.closeLater(scope)
  return { pool, scope, db: scopedPool(scope) }
}

describe("pipelined BEGIN ('auto' mode on a pipeline: true pool)", () => {
  it('sends BEGIN and the first statement before reading anything, and commits them as one unit', async () => {
    const { pool, scope, db } = makeScope()
    const txids = await scope.run(async () => {
      const first = await db.query<{ txid: string }>(
        "INSERT INTO items (v) VALUES ('a') RETURNING txid_current()::text AS txid",
      )
      const more = await Promise.all(
        ['b', 'c'].map((v) =>
          db.query<{ txid: string }>(
            'INSERT INTO items (v) VALUES ($1) RETURNING txid_current()::text AS txid',
            [v],
          ),
        ),
      )
      return [first, ...more].map((r) => r.rows[0]!.txid)
    })
    // The connection's first exchange: BEGIN and INSERT written back to back.
    const begin = wire.indexOf('write BEGIN')
    expect(wire.slice(begin, begin + 2)).toEqual(['write BEGIN', 'write INSERT'])
    expect(wire).toContain('write COMMIT')
    expect(new Set(txids).size).toBe(1)
    expect(await committed()).toEqual(['a', 'b', 'c'])
    expect(scope.stats().totals).toMatchObject({ committed: 1, rolledBack: 0, destroyed: 0 })
    await settled(pool)
  })

  it('a unit that throws after its pipelined first statement rolls everything back', async () => {
    const { pool, scope, db } = makeScope()
    await expect(
      scope.run(async () => {
        await db.query("INSERT INTO items (v) VALUES ('gone')")
        throw new Error('handler failed')
      }),
    ).rejects.toThrow('handler failed')
    expect(await committed()).toEqual([])
    expect(scope.stats().totals).toMatchObject({ rolledBack: 1, destroyed: 0 })
    await settled(pool)
  })

  it('the first statement failing behind BEGIN reports its own error (not "current transaction is aborted")', async () => {
    const { pool, scope, db } = makeScope()
    const error = await scope
      .run(async () => {
        await db.query('SELECT 1 / 0')
      })
      .catch((e: unknown) => e as { code?: string; message: string })
    expect(error).toMatchObject({ code: '22012', message: 'division by zero' })
    // The next unit on the same connection starts clean.
    await scope.run(() => db.query("INSERT INTO items (v) VALUES ('after')"))
    expect(await committed()).toEqual(['after'])
    expect(scope.stats().totals).toMatchObject({ committed: 1, rolledBack: 1, destroyed: 0 })
    await settled(pool)
  })

  it('a statement failing later in the unit reports its own error and commits nothing', async () => {
    const { pool, scope, db } = makeScope()
    await expect(
      scope.run(async () => {
        await db.query("INSERT INTO items (v) VALUES ('x')")
        await db.query("INSERT INTO items (id, v) VALUES (NULL, 'y')")
      }),
    ).rejects.toMatchObject({ code: '23502' })
    expect(await committed()).toEqual([])
    await settled(pool)
  })

  it('a BEGIN that fails on the server: the session reports its error, not the aborted statements behind it', async () => {
    // The server rejects a setting sent with BEGIN (as a bad SET LOCAL would): the transaction
    // block is open but aborted, and every statement pipelined behind it fails with 25P02.
    class FailingBegin extends pg.Client {
      override query(config: any, ...rest: any[]): any {
        if (typeof config === 'string' && config.startsWith('BEGIN')) {
          config = `${config}; SET LOCAL lock_timeout = 'forever'`
        }
        return (super.query as (...a: unknown[]) => unknown)(config, ...rest)
      }
    }
    const { pool, scope, db } = makeScope({ Client: FailingBegin } as pg.PoolConfig)
    const seen: unknown[] = []
    const error = await scope
      .run(async () => {
        await db.query("INSERT INTO items (v) VALUES ('never')").catch((e: unknown) => {
          seen.push(e)
          throw e
        })
      })
      .catch((e: unknown) => e as { code?: string; message: string })
    expect(seen).toHaveLength(1)
    expect(seen[0]).toBe(error)
    expect(error).toMatchObject({ code: '22023', message: expect.stringMatching(/lock_timeout/) })
    expect(await committed()).toEqual([])
    // Its transaction state was unknown to the session: the connection is destroyed, not pooled.
    expect(scope.stats().totals.destroyed).toBe(1)
    await settled(pool)
  })

  it('a unit that swallowed the error of a failed BEGIN still does not report a commit', async () => {
    class FailingBegin extends pg.Client {
      override query(config: any, ...rest: any[]): any {
        if (typeof config === 'string' && config.startsWith('BEGIN')) {
          config = `${config}; SET LOCAL lock_timeout = 'forever'`
        }
        return (super.query as (...a: unknown[]) => unknown)(config, ...rest)
      }
    }
    const { pool, scope, db } = makeScope({ Client: FailingBegin } as pg.PoolConfig)
    await expect(
      scope.run(async () => {
        await db.query("INSERT INTO items (v) VALUES ('never')").catch(() => {})
        return 'ok'
      }),
    ).rejects.toMatchObject({ code: '22023' })
    expect(await committed()).toEqual([])
    expect(scope.stats().totals.committed).toBe(0)
    await settled(pool)
  })

  it("'none' mode on a pipelined pool runs each statement in autocommit", async () => {
    const { pool, scope, db } = makeScope()
    await expect(
      scope.run(
        async () => {
          await db.query("INSERT INTO items (v) VALUES ('kept')")
          await db.query('SELECT 1 / 0')
        },
        { transaction: 'none' },
      ),
    ).rejects.toMatchObject({ code: '22012' })
    expect(wire).not.toContain('write BEGIN')
    expect(await committed()).toEqual(['kept'])
    await settled(pool)
  })
})
