/**
 * Per-test-file databases, so test files run in parallel without sharing rows.
 *
 *   const url = await testDatabase('pg_driver')   // a fresh, empty database
 */

import pg from 'pg'
import { inject } from 'vitest'

export function serverUrl(): string {
  return inject('databaseUrl')
}

export function withDatabase(url: string, name: string): string {
  const u = new URL(url)
  u.pathname = `/${name}`
  return u.toString()
}

/** Drop (if present) and create a database called `scoped_<name>`; returns its URL. */
export async function testDatabase(name: string): Promise<string> {
  const db = `scoped_${name.toLowerCase().replace(/[^a-z0-9_]/g, '_')}`
  const admin = new pg.Client({ connectionString: serverUrl() })
  await admin.connect()
  try {
    await admin.query(`DROP DATABASE IF EXISTS ${db} WITH (FORCE)`)
    await admin.query(`CREATE DATABASE ${db}`)
  } finally {
    await admin.end()
  }
  return withDatabase(serverUrl(), db)
}

/** Run one statement on a fresh, independent connection (not through any pool under test). */
export async function independentQuery<R extends pg.QueryResultRow = any>(
  url: string,
  sql: string,
  params: unknown[] = [],
): Promise<R[]> {
  const c = new pg.Client({ connectionString: url })
  await c.connect()
  try {
    return (await c.query<R>(sql, params)).rows
  } finally {
    await c.end()
  }
}

/** Backends of one application_name, with their state (`idle in transaction` is the leak to look for). */
export async function backends(
  url: string,
  applicationName: string,
): Promise<{ pid: number; state: string }[]> {
  return independentQuery(
    url,
    'SELECT pid, state FROM pg_stat_activity WHERE application_name = $1',
    [applicationName],
  )
}
