/**
 * A fresh database with the `units` table, a pg.Pool whose backends carry an
 * application_name of their own, and a (non-default) scope over it that keeps
 * every error it reports and every warning it logs.
 */
import { createScope, type Scope, type ScopeOptions } from '@scoped/core'
import { type PgDriverOptions, pgDriver, type ScopedPool, scopedPool } from '@scoped/pg'
import pg from 'pg'
import { independentQuery, testDatabase } from '../../support/db.ts'
import { unitsTable } from './apps.ts'

export interface Harness {
  url: string
  pool: pg.Pool
  scope: Scope<pg.PoolClient>
  db: ScopedPool
  /**
   * Errors the scope reported to onError (failed commits, hooks, releases), as text: the first
   * 50, and a count. Never the errors themselves: their stacks keep requests, responses and
   * sessions alive, which the soak's heap measurement would count as a leak.
   */
  reported: { during: string; message: string }[]
  reportedCount(): number
  warnings: string[]
  close(): Promise<void>
}

export async function harness(
  name: string,
  opts: {
    max?: number
    /** Connect here instead of a fresh test database (PgBouncer, a restartable server). */
    url?: string
    pool?: pg.PoolConfig
    driver?: PgDriverOptions
    scope?: Partial<ScopeOptions<pg.PoolClient>>
  } = {},
): Promise<Harness> {
  const url = opts.url ?? (await testDatabase(name))
  if (!opts.url) await independentQuery(url, unitsTable)
  const pool = new pg.Pool({
    connectionString: url,
    max: opts.max ?? 16,
    application_name: `rel_${name}`.slice(0, 63),
    ...opts.pool,
  })
  const reported: Harness['reported'] = []
  let reportedCount = 0
  const report = (during: string, error: unknown) => {
    reportedCount++
    if (reported.length < 50)
      reported.push({ during, message: String((error as Error)?.message ?? error) })
  }
  const warnings: string[] = []
  const scope = createScope({
    driver: pgDriver(pool, { onIdleError: () => {}, ...opts.driver }),
    name,
    default: false,
    acquireTimeoutMs: 10_000,
    leakDetectionMs: 0,
    onError: (error, { during }) => report(during, error),
    logger: {
      warn: (m) => {
        warnings.push(m)
      },
      error: (m, e) => report(m, e),
    },
    ...opts.scope,
  })
  return {
    url,
    pool,
    scope,
    db: scopedPool(scope),
    reported,
    reportedCount: () => reportedCount,
    warnings,
    close: () => scope.close({ timeoutMs: 5_000 }),
  }
}
