/**
 * The README's first example runs as written (it creates its own table);
 * `export { scope }` is appended so the test can read the scope's figures after
 * the example closed it.
 */
import { getDefaultScope, type Scope } from '@scoped/core'
import { expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import { importReadmeExample } from '../../../test/support/readme.ts'

it('the README example creates the table and commits the row in one job', async () => {
  const url = await testDatabase('kysely_readme')
  let scope: Scope<unknown> | undefined
  try {
    ;({ scope } = await importReadmeExample<{ scope: Scope<unknown> }>(
      new URL('..', import.meta.url),
      { append: 'export { scope }', env: { DATABASE_URL: url } },
    ))
    expect(await independentQuery(url, 'SELECT id, sku FROM orders')).toEqual([
      { id: 1, sku: 'A-1' },
    ])
    // One checkout (both statements on it), one COMMIT; closed: no default scope, the pool ended.
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
