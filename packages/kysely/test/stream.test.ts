/**
 * `.stream()` through the global db: it runs on the session's connection, in
 * its unit of work, and holds that connection (and the session) until the
 * stream ends; a statement asked for meanwhile fails at once instead of
 * deadlocking.
 */
import { TransactionStateError } from '@scoped/core'
import { scopedKysely } from '@scoped/kysely'
import { type LogEvent, PostgresDialect, sql } from 'kysely'
import pg from 'pg'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { independentQuery } from '../../../test/support/db.ts'
import { type DB, type Fixture, fixture } from './support.ts'

/**
 * The cursor PostgresDialect needs for `.stream()` (`cursor` in its config),
 * written here because pg-cursor is not a dependency of this workspace. It
 * runs the query as one pg Query and hands the rows out `read(n)` at a time:
 * what is tested is the session's hold on its connection, which is the same
 * whatever the cursor does on the wire.
 */
class BufferedCursor<T> extends pg.Query {
  rows: Promise<T[]>
  at = 0

  constructor(text: string, values: unknown[]) {
    super(text, values)
    this.rows = new Promise<T[]>((resolve, reject) => {
      // pg calls `callback` when the query ends (with an error, or with the result).
      ;(
        this as unknown as { callback: (e: Error | undefined, r: { rows: T[] }) => void }
      ).callback = (err, result) => (err ? reject(err) : resolve(result.rows))
    })
    this.rows.catch(() => {})
  }

  async read(count: number): Promise<T[]> {
    const rows = await this.rows
    const chunk = rows.slice(this.at, this.at + count)
    this.at += chunk.length
    return chunk
  }

  async close(): Promise<void> {
    await this.rows.catch(() => {})
  }
}

let f: Fixture

beforeAll(async () => {
  f = await fixture('kysely_stream', {
    dialect: (pool) => new PostgresDialect({ pool, cursor: BufferedCursor }),
  })
})

afterEach(async () => {
  expect(await f.idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  await independentQuery(f.url, 'TRUNCATE orders')
})

afterAll(async () => {
  await f.close()
})

const txid = sql<string>`txid_current()::text`.as('xid')

describe('stream() in a session', () => {
  it('streams every row in the unit of work; meanwhile the connection is busy and another statement fails fast', async () => {
    const { db, scope } = f
    const result = await scope.run(async () => {
      const before = await db.selectNoFrom([txid]).executeTakeFirstOrThrow()
      const seen: number[] = []
      let during: unknown
      let holders: string[] = []
      for await (const row of db.selectFrom('items').select('n').orderBy('n').stream(10)) {
        seen.push(row.n)
        if (row.n === 1) {
          holders = scope.holders().map((h) => h.state)
          during = await db
            .selectFrom('items')
            .select('n')
            .execute()
            .catch((e) => e)
        }
      }
      const after = await db.selectNoFrom([txid]).executeTakeFirstOrThrow()
      await db
        .insertInto('orders')
        .values({ note: `streamed ${seen.length}` })
        .execute()
      return { seen, during, holders, sameTransaction: before.xid === after.xid }
    })
    expect(result.seen).toEqual(Array.from({ length: 100 }, (_, i) => i + 1))
    expect(result.holders).toEqual(['querying'])
    expect(result.during).toBeInstanceOf(TransactionStateError)
    expect((result.during as Error).message).toContain('stream() on it is still open')
    expect(result.sameTransaction).toBe(true)
    expect(await f.notes()).toEqual(['streamed 100'])
  })

  it('breaking out of the loop ends the stream and frees the connection', async () => {
    const { db, scope } = f
    const count = await scope.run(async () => {
      for await (const row of db.selectFrom('items').select('n').stream(5)) {
        if (row.n >= 3) break
      }
      const { c } = await db
        .selectFrom('items')
        .select((eb) => eb.fn.countAll<string>().as('c'))
        .executeTakeFirstOrThrow()
      return Number(c)
    })
    expect(count).toBe(100)
  })

  it('the session (and its connection) is kept until a stream nobody awaited ends', async () => {
    const { db, scope } = f
    const events: string[] = []
    await scope.run(async () => {
      let firstRow!: () => void
      const started = new Promise<void>((r) => {
        firstRow = r
      })
      // Not awaited: the handler returns while the stream is still being read (as a response
      // body produced after the handler).
      void (async () => {
        let rows = 0
        for await (const _ of db.selectFrom('items').select('n').stream(20)) {
          if (rows++ === 0) firstRow()
          await new Promise((r) => setTimeout(r, 1))
        }
        events.push(`stream ended after ${rows} rows`)
      })()
      await started
      events.push('handler returned')
    })
    events.push('scope ended')
    expect(events).toEqual(['handler returned', 'stream ended after 100 rows', 'scope ended'])
  })

  it("outside a scope with outsideScope: 'pool' it streams from the pool, as plain Kysely", async () => {
    const events: LogEvent[] = []
    const db = scopedKysely<DB>(f.scope, { outsideScope: 'pool', log: (e) => void events.push(e) })
    let rows = 0
    for await (const _ of db.selectFrom('items').select('n').stream(50)) rows++
    expect(rows).toBe(100)
    // One log event for the whole stream, when it ended.
    expect(events.map((e) => e.level === 'query' && e.isStream)).toEqual([true])
  })
})
