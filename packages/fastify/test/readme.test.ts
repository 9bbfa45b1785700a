/**
 * The README's first example runs as written: only where it listens changes
 * (port 0 on 127.0.0.1 instead of 3000), and `app` is exported so the test can
 * stop it.
 */
import type { AddressInfo } from 'node:net'
import { getDefaultScope } from '@scoped/core'
import type { FastifyInstance } from 'fastify'
import { expect, it, vi } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import { importReadmeExample } from '../../../test/support/readme.ts'

it('the README example answers POST /notes with the row, committed, and gives its connection back', async () => {
  const url = await testDatabase('fastify_readme')
  let app: FastifyInstance | undefined
  try {
    ;({ app } = await importReadmeExample<{ app: FastifyInstance }>(
      new URL('..', import.meta.url),
      {
        replace: [
          ['await app.listen({ port: 3000 })', "await app.listen({ port: 0, host: '127.0.0.1' })"],
        ],
        append: 'export { app }',
        env: { DATABASE_URL: url },
      },
    ))
    const scope = getDefaultScope()!
    expect(scope).toBeDefined()
    const { port } = app.server.address() as AddressInfo
    // What the README's curl sends.
    const res = await fetch(`http://127.0.0.1:${port}/notes`, {
      method: 'POST',
      headers: { 'content-type': 'text/plain' },
      body: 'hello',
    })
    expect(res.status).toBe(200)
    expect(await res.json()).toEqual({ id: 1, body: 'hello' })
    expect(await independentQuery(url, 'SELECT id, body FROM notes')).toEqual([
      { id: 1, body: 'hello' },
    ])
    // The CREATE TABLE job and the request each committed; the connection is back in the pool.
    await vi.waitFor(() =>
      expect(scope.stats()).toMatchObject({
        open: 0,
        holding: 0,
        inTransaction: 0,
        totals: { acquired: 2, committed: 2, rolledBack: 0, leaks: 0 },
        pool: { total: 1, idle: 1, waiting: 0 },
      }),
    )
  } finally {
    await app?.close()
    await getDefaultScope()?.close()
  }
})
