/**
 * The README's first example runs as written, against a database that has the
 * `orders` row it updates; `export { scope }` is appended so the test can read
 * the scope's figures after the example closed it.
 */
import { getDefaultScope, type Scope } from '@scoped/core'
import { expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import { importReadmeExample } from '../../../test/support/readme.ts'

it('the README example commits its update, with the session settings it asks for', async () => {
  const url = await testDatabase('pg_readme')
  // A trigger records the settings the update ran under: what pgDriver's options promise.
  await independentQuery(
    url,
    `CREATE TABLE orders (id int PRIMARY KEY, state text, app text, timeout text);
     INSERT INTO orders (id, state) VALUES (42, 'paid'), (43, 'paid');
     CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
       NEW.app := current_setting('application_name');
       NEW.timeout := current_setting('statement_timeout');
       RETURN NEW;
     END $$;
     CREATE TRIGGER stamp BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION stamp()`,
  )
  let scope: Scope<unknown> | undefined
  try {
    ;({ scope } = await importReadmeExample<{ scope: Scope<unknown> }>(
      new URL('..', import.meta.url),
      { append: 'export { scope }', env: { DATABASE_URL: url } },
    ))
    expect(await independentQuery(url, 'SELECT * FROM orders ORDER BY id')).toEqual([
      { id: 42, state: 'shipped', app: 'job:ship', timeout: '5s' },
      { id: 43, state: 'paid', app: null, timeout: null },
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
