/**
 * scopedKysely(scope): one `Kysely<DB>` for the whole application, whose
 * queries run in the current request's or job's session.
 */
import type { Scope } from '@scoped/core'
import {
  type DatabaseConnection,
  DefaultQueryExecutor,
  type Dialect,
  Kysely,
  type KyselyPlugin,
  Log,
  type LogConfig,
} from 'kysely'
import { KyselyDriver } from './kysely-driver.js'
import { ScopedDialect } from './scoped-dialect.js'
import { type OutsideScope, ScopedDriver } from './scoped-driver.js'

export interface ScopedKyselyOptions {
  /**
   * The dialect that compiles the SQL. Default: the dialect of the scope's
   * `kyselyDriver(dialect)`. Connections always come from the scope's driver.
   */
  dialect?: Dialect
  /**
   * Outside any scope: `'throw'` (default) raises `NoActiveScopeError`;
   * `'pool'` runs on a pooled connection of the scope's driver, as plain
   * Kysely would (autocommit; `transaction()` is a real BEGIN/COMMIT).
   */
  outsideScope?: OutsideScope
  /** Kysely plugins, as in `new Kysely({ plugins })`. */
  plugins?: KyselyPlugin[]
  /** Kysely query logging, as in `new Kysely({ log })`. */
  log?: LogConfig
}

const known = new Set(['dialect', 'outsideScope', 'plugins', 'log'])

/**
 * A real `Kysely<DB>` (plugins, `withPlugin`, `withSchema`, `instanceof Kysely`
 * all work) whose queries run on the current session's connection, inside its
 * unit of work. Import it anywhere; no `getSession()` in application code.
 *
 * - Concurrent queries in one session queue on its one connection.
 * - `db.transaction().execute(fn)` and `db.startTransaction()` are savepoints
 *   of the session's transaction (or its outermost transaction when none is
 *   open yet); the global `db` inside `fn` joins the same transaction.
 * - `db.connection()` is the session's connection (with `release: 'idle'`,
 *   one connection for as long as its `execute(fn)` runs).
 * - `db.destroy()` closes the scope.
 *
 * @example
 * ```ts
 * const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL })
 * const dialect = new PostgresDialect({ pool })
 * export const scope = createScope({ driver: kyselyDriver(dialect, { pool }) })
 * export const db = scopedKysely<DB>(scope, { dialect })
 *
 * // in a handler, inside the request's scope:
 * await db.insertInto('orders').values(order).execute()  // committed when the request succeeds
 * ```
 */
export function scopedKysely<DB>(
  scope: Scope<DatabaseConnection>,
  options: ScopedKyselyOptions = {},
): Kysely<DB> {
  if (typeof scope !== 'object' || scope === null || typeof scope.getSession !== 'function') {
    throw new TypeError(
      `scopedKysely(scope): expected a Scope from createScope(), got ${scope === null ? 'null' : typeof scope}`,
    )
  }
  if (!(scope.driver instanceof KyselyDriver)) {
    throw new TypeError(
      `scopedKysely(scope): the scope's driver is '${scope.driver?.name}', not a kyselyDriver. ` +
        'Fix: createScope({ driver: kyselyDriver(dialect) }).',
    )
  }
  if (typeof options !== 'object' || options === null) {
    throw new TypeError(
      `scopedKysely(scope, options): expected an object, got ${options === null ? 'null' : typeof options}`,
    )
  }
  for (const key of Object.keys(options)) {
    if (!known.has(key)) {
      throw new TypeError(
        `scopedKysely(scope, { ${key} }): unknown option. Known options: ${[...known].join(', ')}`,
      )
    }
  }
  const { dialect = scope.driver.dialect, outsideScope = 'throw', plugins, log } = options
  if (
    typeof dialect !== 'object' ||
    dialect === null ||
    typeof dialect.createQueryCompiler !== 'function'
  ) {
    throw new TypeError(
      'scopedKysely(scope, { dialect }): expected a Kysely Dialect, e.g. new PostgresDialect({ pool })',
    )
  }
  if (outsideScope !== 'throw' && outsideScope !== 'pool') {
    throw new TypeError(
      `scopedKysely(scope, { outsideScope }): expected 'throw' or 'pool', got ${JSON.stringify(outsideScope)}`,
    )
  }
  const driver = new ScopedDriver(
    scope,
    scope.driver,
    outsideScope,
    log === undefined ? undefined : new Log(log),
  )
  const scopedDialect = new ScopedDialect(dialect, driver)
  // Built from parts (Kysely's public KyselyProps constructor) so that the driver is also the
  // connection provider: see ScopedDriver.
  const executor = new DefaultQueryExecutor(
    dialect.createQueryCompiler(),
    dialect.createAdapter(),
    driver,
    plugins ?? [],
  )
  return new Kysely<DB>({
    config: {
      dialect: scopedDialect,
      ...(plugins !== undefined && { plugins }),
      ...(log !== undefined && { log }),
    },
    driver,
    executor,
    dialect: scopedDialect,
  })
}
