/**
 * Through PgBouncer in transaction pooling mode (the Debian package; .ci/run
 * installs it; missing, these tests fail, never skip): each adapter's soak
 * with the brief's mix of endings, and proof that session settings do not
 * leak between clients that share one server connection.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { independentQuery, serverUrl, testDatabase, withDatabase } from '../support/db.ts'
import { settingsDoNotLeak } from './scenarios/pgbouncer-settings.ts'
import { soak } from './scenarios/soak.ts'
import { adapters, unitsTable } from './support/apps.ts'
import { type PgBouncer, startPgBouncer } from './support/pgbouncer.ts'
import { size } from './support/report.ts'

let bouncer: PgBouncer
let settingsDb: string

beforeAll(async () => {
  settingsDb = new URL(await testDatabase('rel_bouncer_settings')).pathname.slice(1)
  bouncer = await startPgBouncer(serverUrl(), {
    defaultPoolSize: 10,
    databases: { rel_single: `dbname=${settingsDb} pool_size=1` },
  })
}, 60_000)

afterAll(async () => {
  await bouncer?.stop()
})

describe.each(adapters)('through PgBouncer (transaction pooling): %s', (adapter) => {
  const total = size(500, 10_000)
  it(
    `${total} requests, the soak mix: commits = 2xx/4xx answers, nothing idle in transaction`,
    async () => {
      const direct = await testDatabase(`rel_bouncer_${adapter}`)
      await independentQuery(direct, unitsTable)
      const db = new URL(direct).pathname.slice(1)
      await soak(adapter, {
        total,
        url: bouncer.url(db),
        checkUrl: withDatabase(serverUrl(), db),
        scenario: 'pgbouncer',
        via: `through ${bouncer.version}, pool_mode = transaction, default_pool_size 10 (app pool 16)`,
        maxHeapPerK: size(8 * 1024 * 1024, 64 * 1024),
      })
      // The traffic went through PgBouncer: its server connections (at most 10) stay open after
      // the app closed its pool; direct connections would have closed with it.
      const [row] = await independentQuery<{ n: number }>(
        direct,
        'SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()',
      )
      expect(row?.n).toBeGreaterThan(0)
      expect(row?.n).toBeLessThanOrEqual(10)
    },
    size(120_000, 900_000),
  )
})

it('session settings (statementTimeoutMs, applicationName) set by one request are not seen by the next on the same backend', () =>
  settingsDoNotLeak(bouncer.url('rel_single')))
