/**
 * `timeout()` firing while the handler still waits for a pooled connection:
 * the scope is aborted, the wait ends at once with ScopeAbortedError, and the
 * handler's failure goes through app.onError. The client must still get the
 * timeout's 504, not the orphaned handler's 500 (found by the reliability
 * soak: with no ROLLBACK round trip to wait for, the orphan's error used to
 * land after the middleware had restored the 504). Run for both entry points.
 */
import { Hono } from 'hono'
import { HTTPException } from 'hono/http-exception'
import { timeout } from 'hono/timeout'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type Db, database, deferred, entries, type Running, settled } from './support.ts'

describe.each(entries)('$title', (m) => {
  let d: Db
  let server: Running
  const release = deferred()
  const orphanErrors: string[] = []

  beforeAll(async () => {
    d = await database(m.db('timeout_waiting'), { max: 1 })
    const app = new Hono()
    app.onError((err, c) => {
      if (err instanceof HTTPException) return err.getResponse()
      orphanErrors.push(`${(err as { code?: string }).code}`)
      return c.text(`handler failed: ${err.message}`, 500)
    })
    m.mount(app, d.scope, { routeNames: true })
    app.use('/limited/*', timeout(50))
    app.get('/hold', async (c) => {
      await d.db.query('SELECT 1')
      await release.promise
      return c.text('held')
    })
    // As real code calls the database: handler → service → repository, each a few awaits deep,
    // so the orphan's failure reaches app.onError several microtask turns after its checkout ended.
    const repository = async () => {
      await d.db.query('SELECT 1') // waits: the only connection is held by /hold
    }
    const service = async () => {
      await Promise.resolve()
      await repository()
    }
    app.get('/limited/query', async (c) => {
      await service()
      return c.text('too late')
    })
    server = await m.listen(app)
  })

  afterAll(async () => {
    await server?.close()
    await d?.close()
  })

  it('answers 504 while the handler waits for a connection; the orphan’s error does not replace it', async () => {
    const hold = fetch(`${server.url}/hold`)
    await expect.poll(() => d.scope.stats().holding).toBe(1)
    const statuses: number[] = []
    for (let i = 0; i < 20; i++) statuses.push((await fetch(`${server.url}/limited/query`)).status)
    expect(statuses).toEqual(Array(20).fill(504))
    // The handlers did fail (their checkout was aborted) and went through onError: their 500 lost.
    expect(orphanErrors.length).toBe(20)
    expect(new Set(orphanErrors)).toEqual(new Set(['SCOPE_ABORTED']))
    release.resolve()
    expect((await hold).status).toBe(200)
    await settled(d)
  })
})
