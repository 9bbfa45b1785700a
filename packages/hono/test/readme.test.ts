/**
 * The README's first example runs as written: only where it listens changes
 * (port 0 on 127.0.0.1 instead of 3000), and the server is exported so the
 * test can stop it.
 */
import type http from 'node:http'
import type { AddressInfo } from 'node:net'
import { getDefaultScope } from '@scoped/core'
import { expect, it, vi } from 'vitest'
import { testDatabase } from '../../../test/support/db.ts'
import { importReadmeExample } from '../../../test/support/readme.ts'

it('the README example answers GET /now with the database time, and gives its connection back', async () => {
  const url = await testDatabase('hono_readme')
  let server: http.Server | undefined
  try {
    ;({ server } = await importReadmeExample<{ server: http.Server }>(
      new URL('..', import.meta.url),
      {
        replace: [
          [
            'serve({ fetch: app.fetch, port: 3000 })',
            "export const server = serve({ fetch: app.fetch, port: 0, hostname: '127.0.0.1' })",
          ],
        ],
        env: { DATABASE_URL: url },
      },
    ))
    const scope = getDefaultScope()!
    expect(scope).toBeDefined()
    if (!server.listening) await new Promise((r) => server!.once('listening', r))
    const { port } = server.address() as AddressInfo
    const res = await fetch(`http://127.0.0.1:${port}/now`)
    expect(res.status).toBe(200)
    const body = (await res.json()) as { now: string }
    expect(Object.keys(body)).toEqual(['now'])
    // A timestamp (pg's Date, as JSON), not a string the handler made up.
    expect(body.now).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/)
    expect(Number.isNaN(Date.parse(body.now))).toBe(false)
    // The request's unit of work ended: committed, its connection back in the pool.
    await vi.waitFor(() =>
      expect(scope.stats()).toMatchObject({
        open: 0,
        holding: 0,
        inTransaction: 0,
        totals: { acquired: 1, committed: 1, rolledBack: 0, leaks: 0 },
        pool: { total: 1, idle: 1, waiting: 0 },
      }),
    )
  } finally {
    if (server) await new Promise((r) => server!.close(r))
    await getDefaultScope()?.close()
  }
})
