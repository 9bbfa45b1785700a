/**
 * Session settings behind PgBouncer in transaction pooling: one server
 * connection (`pool_size = 1`) serves two apps in turn. App A's driver sets
 * `statementTimeoutMs` and `applicationName`; app B's sets nothing. B's next
 * request, on the very same server backend (same pid), must see the server
 * defaults: `SET LOCAL` ended with A's transaction.
 *
 * A control proves the check can see a leak: a plain session-level `SET` from
 * one client IS seen by the next client on that backend.
 */
import { serve } from '@hono/node-server'
import { createScope, type Scope } from '@scoped/core'
import { scopedSession } from '@scoped/hono'
import { type PgDriverOptions, pgDriver, scopedPool } from '@scoped/pg'
import { Hono } from 'hono'
import pg from 'pg'
import { expect } from 'vitest'
import { record } from '../support/report.ts'

interface Seen {
  statement_timeout: string
  application_name: string
  pid: number
}

async function app(url: string, name: string, driver: PgDriverOptions) {
  const pool = new pg.Pool({ connectionString: url, max: 1 })
  const scope: Scope<pg.PoolClient> = createScope({
    driver: pgDriver(pool, driver),
    name,
    default: false,
  })
  const db = scopedPool(scope)
  const hono = new Hono().use(scopedSession(scope))
  hono.get('/settings', async (c) => {
    const { rows } = await db.query<Seen>(
      "SELECT current_setting('statement_timeout') AS statement_timeout, current_setting('application_name') AS application_name, pg_backend_pid() AS pid",
    )
    return c.json(rows[0])
  })
  const server = await new Promise<ReturnType<typeof serve>>((resolve) => {
    const s = serve({ fetch: hono.fetch, port: 0, hostname: '127.0.0.1' }, () => resolve(s))
  })
  const port = (server.address() as { port: number }).port
  return {
    get: async (): Promise<Seen> =>
      (await fetch(`http://127.0.0.1:${port}/settings`)).json() as Promise<Seen>,
    async close() {
      await new Promise<void>((r) => server.close(() => r()))
      await scope.close()
    },
  }
}

/** `url` goes through PgBouncer to a database entry with pool_size = 1. */
export async function settingsDoNotLeak(url: string): Promise<void> {
  const started = performance.now()
  const a = await app(url, 'bouncer-a', { statementTimeoutMs: 1234, applicationName: 'auto' })
  const b = await app(url, 'bouncer-b', {})
  const problems: string[] = []
  const rounds = 20
  let sameBackend = 0
  try {
    for (let i = 0; i < rounds; i++) {
      const seenA = await a.get()
      const seenB = await b.get()
      if (seenA.statement_timeout !== '1234ms' || seenA.application_name !== 'GET /settings') {
        problems.push(`A's own settings are not applied: ${JSON.stringify(seenA)}`)
      }
      if (seenB.statement_timeout === '1234ms' || seenB.application_name === 'GET /settings') {
        problems.push(`B saw A's settings: ${JSON.stringify(seenB)}`)
      }
      if (seenA.pid === seenB.pid) sameBackend++
    }
    if (sameBackend !== rounds)
      problems.push(`A and B shared the backend in ${sameBackend} of ${rounds} rounds`)

    // Control: a session-level SET does leak to the next client on the backend.
    const c1 = new pg.Client({ connectionString: url })
    const c2 = new pg.Client({ connectionString: url })
    await c1.connect()
    await c2.connect()
    let control = ''
    try {
      await c1.query('SET statement_timeout = 4321')
      control = (await c2.query<{ t: string }>("SELECT current_setting('statement_timeout') AS t"))
        .rows[0]!.t
      await c2.query('RESET statement_timeout')
    } finally {
      await c1.end()
      await c2.end()
    }
    if (control !== '4321ms')
      problems.push(
        `control: a session-level SET was not seen by the next client (${control}); the check proves nothing`,
      )
    record({
      scenario: 'pgbouncer',
      adapter: 'hono (settings)',
      load: `${rounds} rounds of app A then app B through one server connection (pool_size = 1)`,
      faults: `A: statementTimeoutMs 1234, applicationName 'auto'; control: a session-level SET leaked to the next client (saw ${control})`,
      failed: 0,
      why: `B never saw A's settings on the same backend (${sameBackend}/${rounds} rounds on one pid)`,
      leaked: 0,
      lost: 0,
      durationMs: performance.now() - started,
      problems,
    })
  } finally {
    await a.close()
    await b.close()
  }
  expect(problems).toEqual([])
}
