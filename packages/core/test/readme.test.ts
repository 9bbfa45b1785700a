/**
 * The README's first example runs as written, against a database that has the
 * `jobs` table it updates. Its `new pg.Pool({ max: 10 })` connects where libpq's
 * PG* variables say, as it would for a user; `export { scope }` is appended so
 * the test can read the scope's figures after the example closed it.
 */
import { getDefaultScope, type Scope } from '@scoped/core'
import { expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import { importReadmeExample } from '../../../test/support/readme.ts'

/** The PG* variables node-postgres (like libpq) reads when it is given no connection string. */
function libpqEnv(url: string): Record<string, string> {
  const u = new URL(url)
  return {
    PGHOST: u.hostname,
    PGPORT: u.port || '5432',
    PGUSER: decodeURIComponent(u.username),
    PGPASSWORD: decodeURIComponent(u.password),
    PGDATABASE: decodeURIComponent(u.pathname.slice(1)),
  }
}

it('the README example commits its job and closes the scope', async () => {
  const url = await testDatabase('core_readme')
  await independentQuery(url, 'CREATE TABLE jobs (id int PRIMARY KEY, state text)')
  await independentQuery(url, "INSERT INTO jobs VALUES (1, 'queued'), (2, 'queued')")
  let scope: Scope<unknown> | undefined
  try {
    ;({ scope } = await importReadmeExample<{ scope: Scope<unknown> }>(
      new URL('..', import.meta.url),
      { append: 'export { scope }', env: libpqEnv(url) },
    ))
    expect(await independentQuery(url, 'SELECT id, state FROM jobs ORDER BY id')).toEqual([
      { id: 1, state: 'done' },
      { id: 2, state: 'queued' },
    ])
    // One checkout, one COMMIT; closed: no default scope any more, and the pool ended.
    expect(scope.stats()).toMatchObject({
      open: 0,
      holding: 0,
      totals: { acquired: 1, committed: 1, rolledBack: 0, leaks: 0 },
      pool: { total: 0 },
    })
    expect(getDefaultScope()).toBeUndefined()
  } finally {
    await (scope ?? getDefaultScope())?.close()
  }
})
