/**
 * Helpers for the foundation tests: a pg.Pool whose backends carry an
 * application_name unique to the test (so pg_stat_activity can be filtered to
 * it), a count of the physical connections it opened, and the checks every
 * test ends with (all clients back in the pool, nothing idle in transaction).
 */

import pg from 'pg'
import { expect } from 'vitest'
import { backends, independentQuery } from '../support/db.ts'

let counter = 0

/** An application_name unique to this test run and test (at most 63 bytes, as PostgreSQL keeps). */
export function uniqueAppName(label: string): string {
  return `t_${label}_${process.pid}_${++counter}`.slice(0, 63)
}

export interface TestPool {
  pool: pg.Pool
  /** The pool's application_name: filter pg_stat_activity with it. */
  app: string
  /** Physical connections the pool opened so far. */
  connects(): number
  /** Errors the pool emitted for idle clients (pgDriver also listens; this keeps them for asserts). */
  idleErrors: Error[]
}

export function testPool(url: string, label: string, config: pg.PoolConfig = {}): TestPool {
  const app = uniqueAppName(label)
  const pool = new pg.Pool({ connectionString: url, application_name: app, max: 5, ...config })
  let connects = 0
  const idleErrors: Error[] = []
  pool.on('connect', () => {
    connects++
  })
  pool.on('error', (e) => {
    idleErrors.push(e)
  })
  return { pool, app, connects: () => connects, idleErrors }
}

/** No backend of `app` is left `idle in transaction` (the leak a forgotten ROLLBACK leaves). */
export async function expectNoIdleInTransaction(url: string, app: string): Promise<void> {
  const rows = await backends(url, app)
  expect(rows.filter((r) => r.state?.startsWith('idle in transaction'))).toEqual([])
}

/** Every client the pool opened is back in it, and nobody waits. */
export function expectPoolSettled(pool: pg.Pool): void {
  expect({ total: pool.totalCount, idle: pool.idleCount, waiting: pool.waitingCount }).toEqual({
    total: pool.idleCount,
    idle: pool.idleCount,
    waiting: 0,
  })
}

/** Create a table `name (id serial, v text)` through an independent connection. */
export async function createTable(url: string, name: string, columns = 'v text'): Promise<void> {
  await independentQuery(url, `CREATE TABLE ${name} (id serial PRIMARY KEY, ${columns})`)
}

/** Rows of a table, read on an independent connection (so only committed rows are seen). */
export async function committedRows<R extends pg.QueryResultRow = any>(
  url: string,
  sql: string,
  params: unknown[] = [],
): Promise<R[]> {
  return independentQuery<R>(url, sql, params)
}

/** Wait until `check()` is true, polling; throws with `what` if it never is within `ms`. */
export async function waitFor(what: string, check: () => boolean | Promise<boolean>, ms = 5_000) {
  const deadline = Date.now() + ms
  for (;;) {
    if (await check()) return
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 10))
  }
}

/** A promise and its resolve, to hold a scope open until the test lets it go. */
export function gate(): { promise: Promise<void>; open: () => void } {
  let open!: () => void
  const promise = new Promise<void>((r) => {
    open = r
  })
  return { promise, open }
}

/** A logger that keeps what it is told, for asserts on warnings. */
export function memoryLogger(): {
  warnings: string[]
  errors: { message: string; error: unknown }[]
  warn(message: string): void
  error(message: string, error?: unknown): void
} {
  const warnings: string[] = []
  const errors: { message: string; error: unknown }[] = []
  return {
    warnings,
    errors,
    warn: (m) => {
      warnings.push(m)
    },
    error: (message, error) => {
      errors.push({ message, error })
    },
  }
}
