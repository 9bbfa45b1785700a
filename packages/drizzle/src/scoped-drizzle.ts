/**
 * `scopedDrizzle(scope)`: a real Drizzle database (node-postgres) whose every
 * query runs on the current session's checked-out pg client, and whose
 * `transaction()` is the session's.
 */
import type { IsolationLevel, Scope, TxOptions } from '@scoped/core'
import { serial } from '@scoped/pg'
import type { DrizzleConfig } from 'drizzle-orm'
import { TransactionRollbackError } from 'drizzle-orm'
import { drizzle, type NodePgDatabase, type NodePgTransaction } from 'drizzle-orm/node-postgres'
import type { PgTransactionConfig } from 'drizzle-orm/pg-core'
import type pg from 'pg'

/**
 * What Drizzle's node-postgres session is given as its client: only `query()`,
 * routed to the current session. (Its class name must not contain "Pool":
 * Drizzle takes such a client for a pool and checks a second connection out of
 * it for `transaction()`.)
 */
class SessionRoutedClient {
  readonly #scope: Scope<pg.PoolClient>
  constructor(scope: Scope<pg.PoolClient>) {
    this.#scope = scope
  }

  query(config: unknown, values?: unknown): Promise<unknown> {
    // Statements of one session go to its client one at a time, in call order.
    return this.#scope
      .getSession()
      .use((client) =>
        serial(client, () => client.query(config as pg.QueryConfig, values as unknown[])),
      )
  }
}

const isolations: Record<NonNullable<PgTransactionConfig['isolationLevel']>, IsolationLevel> = {
  'read uncommitted': 'read committed', // PostgreSQL runs READ UNCOMMITTED as READ COMMITTED
  'read committed': 'read committed',
  'repeatable read': 'repeatable read',
  serializable: 'serializable',
}

function txOptions(config: PgTransactionConfig | undefined): TxOptions {
  if (config === undefined) return {}
  if (config.deferrable !== undefined) {
    throw new TypeError(
      'scopedDrizzle: transaction(fn, { deferrable }) is not supported; the session opens the transaction. ' +
        "Fix: run SET TRANSACTION DEFERRABLE as the transaction's first statement.",
    )
  }
  const opts: TxOptions = {}
  if (config.isolationLevel !== undefined) {
    const isolation = isolations[config.isolationLevel]
    if (!isolation) {
      throw new TypeError(
        `scopedDrizzle: transaction(fn, { isolationLevel }): unknown level ${JSON.stringify(config.isolationLevel)}`,
      )
    }
    opts.isolation = isolation
  }
  if (config.accessMode !== undefined) opts.readOnly = config.accessMode === 'read only'
  return opts
}

export type ScopedDrizzle<TSchema extends Record<string, unknown>> = NodePgDatabase<TSchema>

/**
 * A Drizzle database for module scope: its queries (query builder, relational
 * queries, `execute`) run on the current request's or job's pg client, inside
 * its unit of work; outside a scope they throw `NoActiveScopeError`, after the
 * request ended `SessionClosedError`. `db.transaction(fn, config)` is the
 * session's `transaction()`: a SAVEPOINT when a transaction is open (in
 * `'auto'`, once the unit of work ran a statement), else BEGIN … COMMIT — also
 * as the scope's first statement, where it commits when `fn` returns; `tx.rollback()`
 * and a nested `tx.transaction()` work as in Drizzle.
 *
 * The scope's driver is `pgDriver(pool)` from `@scoped/pg`: checkout, BEGIN,
 * COMMIT, savepoints, destroy-on-error and statement cancel are that driver's.
 *
 * @example
 * ```ts
 * import pg from 'pg'
 * import { createScope } from '@scoped/core'
 * import { pgDriver } from '@scoped/pg'
 * import { scopedDrizzle } from '@scoped/drizzle'
 * import * as schema from './schema.js'
 *
 * const scope = createScope({ driver: pgDriver(new pg.Pool({ connectionString: url })) })
 * export const db = scopedDrizzle(scope, { schema })
 * // in a handler:
 * await db.insert(schema.orders).values({ total: 10 }) // committed when the request ends
 * ```
 */
export function scopedDrizzle<TSchema extends Record<string, unknown> = Record<string, never>>(
  scope: Scope<pg.PoolClient>,
  config: DrizzleConfig<TSchema> = {},
): ScopedDrizzle<TSchema> {
  if (typeof scope !== 'object' || scope === null || typeof scope.getSession !== 'function') {
    throw new TypeError(
      `scopedDrizzle(scope): expected a Scope from createScope(), got ${scope === null ? 'null' : typeof scope}`,
    )
  }
  if (scope.driver.name !== 'pg') {
    throw new TypeError(
      `scopedDrizzle(scope): the scope's driver is '${scope.driver.name}'; Drizzle's node-postgres database needs ` +
        'pg clients. Fix: createScope({ driver: pgDriver(pool) }).',
    )
  }
  const client = new SessionRoutedClient(scope) as unknown as pg.PoolClient
  const db = drizzle({ ...config, client }) as unknown as NodePgDatabase<TSchema>

  type Tx = NodePgTransaction<TSchema, any>
  const transaction = async <T>(
    fn: (tx: Tx) => Promise<T>,
    txConfig?: PgTransactionConfig,
  ): Promise<T> => {
    const opts = txOptions(txConfig)
    return scope.getSession().transaction(() => fn(tx), opts)
  }
  // The transaction object is the same database (its queries already run on the session's
  // client), plus Drizzle's tx-only calls.
  const tx = Object.create(db, {
    transaction: { value: transaction },
    rollback: {
      value: () => {
        throw new TransactionRollbackError()
      },
    },
    setTransaction: {
      value: () => {
        throw new TypeError(
          'scopedDrizzle: tx.setTransaction() is not supported; pass the config to db.transaction(fn, config).',
        )
      },
    },
  }) as Tx
  Object.defineProperty(db, 'transaction', { value: transaction })
  return db
}
