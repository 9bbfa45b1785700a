/**
 * One PostgreSQL database per test file, a pg.Pool, PostgresDialect, a scope
 * over kyselyDriver and the global `db` — what an application would set up.
 */
import { createScope, type Scope } from '@scoped/core'
import { kyselyDriver, type ScopedKyselyOptions, scopedKysely } from '@scoped/kysely'
import { type Generated, type Kysely, PostgresDialect } from 'kysely'
import pg from 'pg'
import { backends, independentQuery, testDatabase } from '../../../test/support/db.ts'

export interface DB {
  orders: {
    id: Generated<number>
    note: string
    /** The backend that inserted the row. */
    pid: Generated<number>
    /** The transaction that inserted the row (txid_current(), a bigint). */
    xid: Generated<string>
  }
  /** Deferred unique constraint: a duplicate fails at COMMIT, not at INSERT. */
  tickets: { code: string }
  items: { n: number }
}

export const schema = `
  CREATE TABLE orders (
    id serial PRIMARY KEY,
    note text NOT NULL,
    pid int NOT NULL DEFAULT pg_backend_pid(),
    xid bigint NOT NULL DEFAULT txid_current()
  );
  CREATE TABLE tickets (code text, CONSTRAINT tickets_code UNIQUE (code) DEFERRABLE INITIALLY DEFERRED);
  CREATE TABLE items (n int NOT NULL);
  INSERT INTO items SELECT generate_series(1, 100);
  CREATE SCHEMA archive;
  CREATE TABLE archive.orders (LIKE orders INCLUDING DEFAULTS);
`

export interface Fixture {
  url: string
  app: string
  pool: pg.Pool
  dialect: PostgresDialect
  scope: Scope<import('kysely').DatabaseConnection>
  db: Kysely<DB>
  /** Notes of the committed rows of `table`, in insertion order (read on an independent connection). */
  notes(table?: string): Promise<string[]>
  /** Nothing checked out, and no backend of this pool left `idle in transaction`. */
  idle(): Promise<{ checkedOut: number; idleInTransaction: number }>
  close(): Promise<void>
}

export async function fixture(
  name: string,
  opts: {
    dialect?: (pool: pg.Pool) => PostgresDialect
    db?: ScopedKyselyOptions
    max?: number
  } = {},
): Promise<Fixture> {
  const url = await testDatabase(name)
  await independentQuery(url, schema)
  const app = `kysely_${name}_${process.pid}`
  const pool = new pg.Pool({ connectionString: url, application_name: app, max: opts.max ?? 5 })
  const dialect = opts.dialect?.(pool) ?? new PostgresDialect({ pool })
  const scope = createScope({ driver: kyselyDriver(dialect, { pool }), name, default: false })
  const db = scopedKysely<DB>(scope, { dialect, ...opts.db })
  return {
    url,
    app,
    pool,
    dialect,
    scope,
    db,
    async notes(table = 'orders') {
      const rows = await independentQuery(url, `SELECT note FROM ${table} ORDER BY id`)
      return rows.map((r) => r.note)
    },
    async idle() {
      const list = await backends(url, app)
      return {
        checkedOut: pool.totalCount - pool.idleCount,
        idleInTransaction: list.filter((b) => b.state === 'idle in transaction').length,
      }
    },
    close: () => scope.close(),
  }
}

/**
 * A cursor for `.stream()` (pg-cursor is not a dependency): one pg Query, rows handed out n at a
 * time. Its buffer is not called `rows`: pg.Query reads a `rows` property as the portal's row
 * limit and then runs the query in extended-protocol, portal-suspended mode, which leaves the
 * backend waiting for a Sync after an error (a test artifact, not the library's behaviour).
 */
export class ChunkedCursor<T> extends pg.Query {
  buffered: Promise<T[]>
  at = 0
  constructor(text: string, values: unknown[]) {
    super(text, values)
    this.buffered = new Promise<T[]>((resolve, reject) => {
      ;(this as unknown as { callback: (e?: Error, r?: { rows: T[] }) => void }).callback = (
        e,
        r,
      ) => (e ? reject(e) : resolve(r!.rows))
    })
    this.buffered.catch(() => {})
  }
  async read(n: number): Promise<T[]> {
    const rows = await this.buffered
    const chunk = rows.slice(this.at, this.at + n)
    this.at += chunk.length
    return chunk
  }
  async close(): Promise<void> {
    await this.buffered.catch(() => {})
  }
}
