/**
 * PostgreSQL stopped mid-load for 3 s and started again: requests fail fast
 * while it is down, and succeed again after without restarting the app. Runs
 * against an embedded server of its own (the shared one must stay up), kept
 * on disk between stop() and start(). See scenarios/restart.ts.
 */
import { afterAll, beforeAll, describe, it } from 'vitest'
import { type Database, startDatabase } from '../../scripts/embedded-db.ts'
import { restart } from './scenarios/restart.ts'
import { type Adapter, adapters } from './support/apps.ts'
import { size } from './support/report.ts'

let server: Database

beforeAll(async () => {
  server = await startDatabase({ forceEmbedded: true, restartable: true })
}, 120_000)

afterAll(async () => {
  await server?.stop()
})

describe.each(size<readonly Adapter[]>(['hono'], adapters))(
  'server restart under load through %s',
  (adapter) => {
    it(
      'stopped for 3 s: fast, clear failures while down; every request after the restart succeeds; nothing leaks',
      () =>
        restart(adapter, server, {
          downMs: 3_000,
          beforeMs: size(1_000, 5_000),
          afterMs: size(1_500, 5_000),
          acquireTimeoutMs: 2_000,
        }),
      120_000,
    )
  },
)
