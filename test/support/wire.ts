/**
 * What goes over a pool's sockets, in order: each statement a client writes
 * (by its first keyword) and each read. For tests that prove statements were
 * pipelined (written back to back, before any answer was read).
 */
import pg from 'pg'
import { afterAll, beforeAll, beforeEach, expect } from 'vitest'
import { backends, independentQuery, testDatabase } from './db.ts'

const pgPool = pg.Pool

export function recordWire(pool: pg.Pool, wire: string[]): void {
  pool.on('connect', (client) => {
    const stream = (client as unknown as { connection: { stream: unknown } }).connection.stream as {
      write: (chunk: Buffer, ...rest: unknown[]) => boolean
      on: (e: string, f: () => void) => void
    }
    const write = stream.write.bind(stream)
    stream.write = (chunk: Buffer, ...rest: unknown[]) => {
      const sql = /(BEGIN|begin|COMMIT|commit|ROLLBACK|rollback|INSERT|insert|SELECT|select)/.exec(
        chunk.toString('utf8'),
      )?.[1]
      if (sql) wire.push(`write ${sql.toUpperCase()}`)
      return write(chunk, ...rest)
    }
    stream.on('data', () => wire.push('read'))
  })
}

/**
 * A test file's setup for pipelining tests: a database with an `items (id, v)`
 * table emptied before each test, pools with `pipeline: true` whose wire is
 * recorded, and the checks every such test ends with. Call it at the top level
 * of the file (it registers the vitest hooks).
 */
export function pipelineFixture(name: string) {
  const app = `${name}_${process.pid}`
  const wire: string[] = []
  const closers: { close(): Promise<void> }[] = []
  let url = ''
  beforeAll(async () => {
    url = await testDatabase(name)
    await independentQuery(url, 'CREATE TABLE items (id serial PRIMARY KEY, v text NOT NULL)')
  })
  beforeEach(async () => {
    wire.length = 0
    await independentQuery(url, 'TRUNCATE items')
  })
  afterAll(async () => {
    await Promise.all(closers.map((c) => c.close()))
  })
  return {
    /** What went over the pools' sockets, in order, since the test began. */
    wire,
    /** A pipelined pool (max 2) whose wire is recorded; `config` may override anything. */
    pool(config: pg.PoolConfig & { pipeline?: boolean } = {}): pg.Pool {
      const pool = new pgPool({
        connectionString: url,
        application_name: app,
        max: 2,
        pipeline: true,
        ...config,
      } as pg.PoolConfig)
      recordWire(pool, wire)
      return pool
    },
    /** Close this (a scope) after the file's tests. */
    closeLater(c: { close(): Promise<void> }): void {
      closers.push(c)
    },
    /** The committed `items.v`, in insertion order, read on an independent connection. */
    committed: async (): Promise<string[]> =>
      (await independentQuery(url, 'SELECT v FROM items ORDER BY id')).map((r) => r.v),
    /** Every connection back in the pool, and no backend left `idle in transaction`. */
    settled: async (pool: pg.Pool): Promise<void> => {
      expect(pool.totalCount).toBe(pool.idleCount)
      const left = await backends(url, app)
      expect(left.filter((b) => b.state.startsWith('idle in transaction'))).toEqual([])
    },
  }
}
