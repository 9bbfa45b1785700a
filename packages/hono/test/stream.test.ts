/**
 * Bodies produced after the handler returned (Hono's stream() / streamSSE()):
 * the session lives until the body ends, then commits; a failed commit cuts
 * the response off, so the client never sees a clean end. Run for both entry
 * points (each request followed by its `x-test-id`).
 */
import { ScopedError } from '@scoped/core'
import { Hono } from 'hono'
import { stream, streamSSE } from 'hono/streaming'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import {
  aborted,
  type Db,
  database,
  deferred,
  entries,
  type Running,
  rawRequest,
  rowIds,
  settled,
  until,
} from './support.ts'

const setup = `
  CREATE TABLE items (id text PRIMARY KEY);
  CREATE TABLE parents (id int PRIMARY KEY);
  CREATE TABLE children (
    id text PRIMARY KEY,
    parent_id int REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED
  );
`

let gate = deferred()
let late = deferred<unknown>()
const encoder = new TextEncoder()

async function readAll(
  reader: ReadableStreamDefaultReader<Uint8Array>,
  soFar = '',
): Promise<string> {
  const decoder = new TextDecoder()
  let text = soFar
  for (;;) {
    const { done, value } = await reader.read()
    if (done) return text
    text += decoder.decode(value, { stream: true })
  }
}

const orphanNames = {
  // The middleware names a session after the route; scopedFetch's are named after x-test-id.
  middleware: 'GET /stream-orphan/:id',
  fetch: 'stream-orphan',
}

describe.each(entries.map((e) => ({ ...e, orphanName: orphanNames[e.kind] })))('$title', (m) => {
  let d: Db
  let server: Running

  beforeAll(async () => {
    d = await database(m.db('stream'), { setup })
    const insert = (id: string) => d.db.query('INSERT INTO items (id) VALUES ($1)', [id])
    const orphan = (id: string) =>
      d.db.query('INSERT INTO children (id, parent_id) VALUES ($1, 999)', [id])

    const app = new Hono()
    app.onError((_err, c) => c.text('Internal Server Error', 500))
    m.mount(app, d.scope)

    app.get('/stream/:id', (c) => {
      const id = c.req.param('id')
      const handlerSession = d.scope.getSession().id
      return stream(c, async (s) => {
        await s.write('start\n')
        await insert(`${id}-a`)
        await s.write('a\n')
        await gate.promise
        await insert(`${id}-b`)
        await s.write(`same session: ${d.scope.getSession().id === handlerSession}\n`)
      })
    })

    app.get('/sse/:id', (c) =>
      streamSSE(c, async (s) => {
        for (let i = 0; i < 3; i++) {
          await insert(`${c.req.param('id')}-${i}`)
          await s.writeSSE({ event: 'inserted', data: String(i) })
          await s.sleep(5)
        }
      }),
    )

    app.get('/stream-orphan/:id', (c) =>
      stream(c, async (s) => {
        await s.write('start\n')
        await orphan(c.req.param('id'))
        await s.sleep(5)
        await s.write('accepted until COMMIT\n')
      }),
    )

    app.get('/stream-abort/:id', (c) =>
      stream(c, async (s) => {
        await insert(c.req.param('id'))
        await s.write('a\n')
        await gate.promise
        await d.db.query('SELECT 1').then(() => late.resolve('no error'), late.resolve)
      }),
    )

    // Hono catches a stream() callback's error and ends the body normally.
    app.get('/stream-throws/:mode/:id', (c) =>
      stream(
        c,
        async (s) => {
          await insert(c.req.param('id'))
          await s.write('partial')
          throw new Error('failed mid-stream')
        },
        async () => {
          if (c.req.param('mode') === 'rollback') d.scope.getSession().setRollbackOnly()
        },
      ),
    )

    // The client leaves before the handler returns its stream.
    app.get('/late-stream/:id', async (c) => {
      const session = d.scope.getSession()
      await insert(c.req.param('id'))
      await aborted(session.signal)
      return stream(c, async (s) => {
        await s.write('nobody')
        await s.sleep(30) // still producing when the middleware looks at it
        await s.write('reads this')
      })
    })

    // A Content-Length body streamed in two parts: the last part is held back until COMMIT.
    app.get('/length-orphan/:id', async (c) => {
      await orphan(c.req.param('id'))
      const body = new ReadableStream<Uint8Array>({
        async start(controller) {
          controller.enqueue(encoder.encode('first half,'))
          await new Promise((r) => setTimeout(r, 20))
          controller.enqueue(encoder.encode('second half'))
          controller.close()
        },
      })
      return c.body(body, 200, { 'content-length': '22' })
    })

    // A stream body that is already complete when the handler returns: committed before sending.
    app.get('/finished-stream/:kind/:id', async (c) => {
      const id = c.req.param('id')
      if (c.req.param('kind') === 'orphan') await orphan(id)
      else await insert(id)
      return c.body(
        new ReadableStream<Uint8Array>({
          start(controller) {
            controller.enqueue(encoder.encode('all of it'))
            controller.close()
          },
        }),
      )
    })

    server = await m.listen(app)
  })

  afterAll(async () => {
    gate.resolve()
    await server?.close()
    await d?.close()
  })

  describe('stream()', () => {
    it('keeps the session while the body streams and queries, then commits before the end reaches the client', async () => {
      gate = deferred()
      const id = 'streamed'
      const t = m.tally(d.scope.name)
      const res = await fetch(`${server.url}/stream/${id}`, { headers: { 'x-test-id': id } })
      expect(res.status).toBe(200)
      const reader = res.body!.getReader()
      const decoder = new TextDecoder()
      let text = ''
      while (!text.includes('a\n')) text += decoder.decode((await reader.read()).value)

      // Mid-body: one connection held, nothing released, nothing visible yet.
      expect(d.scope.stats().holding).toBe(1)
      expect(t.releasesOf(id)).toBe(0)
      expect(await rowIds(d.url, 'SELECT id FROM items WHERE id LIKE $1', [`${id}-%`])).toEqual([])

      gate.resolve()
      text = await readAll(reader, text)
      expect(text).toBe('start\na\nsame session: true\n')
      // The clean end arrived: both rows are committed already.
      expect(
        await rowIds(d.url, 'SELECT id FROM items WHERE id LIKE $1 ORDER BY id', [`${id}-%`]),
      ).toEqual([`${id}-a`, `${id}-b`])
      await settled(d)
      t.stop()
      expect(t.acquiresOf(id)).toBe(1)
      expect(t.releasesOf(id)).toBe(1)
      expect(d.pool.totalCount).toBe(d.pool.idleCount)
    })

    it('streamSSE(): events and statements interleave in one unit of work', async () => {
      const id = 'sse'
      const t = m.tally(d.scope.name)
      const res = await fetch(`${server.url}/sse/${id}`, { headers: { 'x-test-id': id } })
      expect(res.headers.get('content-type')).toBe('text/event-stream')
      const text = await res.text()
      expect(text.match(/event: inserted/g)).toHaveLength(3)
      expect(
        await rowIds(d.url, 'SELECT id FROM items WHERE id LIKE $1 ORDER BY id', [`${id}-%`]),
      ).toEqual(['sse-0', 'sse-1', 'sse-2'])
      await settled(d)
      t.stop()
      expect(t.releasesOf(id)).toBe(1)
      expect(d.pool.totalCount).toBe(d.pool.idleCount)
    })

    it('a COMMIT that fails at the end of the body cuts the response off: the client sees an error, not an end', async () => {
      const id = 'stream-orphan'
      const t = m.tally(d.scope.name)
      d.reported.length = 0
      const res = await fetch(`${server.url}/stream-orphan/${id}`, { headers: { 'x-test-id': id } })
      expect(res.status).toBe(200) // sent before the COMMIT could run
      await expect(res.text()).rejects.toThrow(/terminated/)
      await settled(d)
      t.stop()
      expect(await rowIds(d.url, 'SELECT id FROM children WHERE id = $1', [id])).toEqual([])
      expect(t.releasesOf(id)).toBe(1)
      expect(d.pool.totalCount).toBe(d.pool.idleCount)
      // Reported through the scope's onError, since app.onError can no longer answer.
      expect(d.reported).toHaveLength(1)
      expect(d.reported[0]!.during).toContain(
        `COMMIT of '${m.orphanName}' after its streamed response (the response was cut off)`,
      )
      expect((d.reported[0]!.error as { code?: string }).code).toBe('23503')
    })

    it('with a Content-Length, the last part is held back, so the client never has the whole body', async () => {
      const id = 'length-orphan'
      const call = rawRequest(server.port, { path: `/length-orphan/${id}` })
      const result = await call.done
      expect('error' in result).toBe(true)
      expect(call.received()).toBe('first half,')
      await settled(d)
      expect(await rowIds(d.url, 'SELECT id FROM children WHERE id = $1', [id])).toEqual([])
      expect(d.pool.totalCount).toBe(d.pool.idleCount)
    })

    it('a client that goes away mid-body: rollback, one release; the stream callback cannot use the session after', async () => {
      gate = deferred()
      late = deferred()
      const id = 'stream-abort'
      const t = m.tally(d.scope.name)
      const call = rawRequest(server.port, {
        path: `/stream-abort/${id}`,
        headers: { 'x-test-id': id },
      })
      const firstChunk = new Promise<void>((resolve) =>
        call.req.on('response', (res) => res.once('data', () => resolve())),
      )
      await firstChunk
      call.req.destroy()
      await until(() => t.releasesOf(id) === 1, 'released after the client left')
      gate.resolve()
      const after = await late.promise
      expect(after).toBeInstanceOf(ScopedError)
      expect((after as ScopedError).code).toMatch(/SCOPE_ABORTED|SESSION_CLOSED/)
      await settled(d)
      t.stop()
      expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([])
      expect(t.releasesOf(id)).toBe(1)
      expect(d.pool.totalCount).toBe(d.pool.idleCount)
    })

    it('an error in a stream() callback: Hono ends the body normally, so it commits unless onError says setRollbackOnly()', async () => {
      const kept = await fetch(`${server.url}/stream-throws/commit/stream-throws-kept`)
      expect(await kept.text()).toBe('partial')
      const undone = await fetch(`${server.url}/stream-throws/rollback/stream-throws-undone`)
      expect(await undone.text()).toBe('partial')
      await settled(d)
      expect(await rowIds(d.url, "SELECT id FROM items WHERE id LIKE 'stream-throws-%'")).toEqual([
        'stream-throws-kept',
      ])
      expect(d.pool.totalCount).toBe(d.pool.idleCount)
    })

    it('a client that left before the handler returned its stream: rollback, one release', async () => {
      const id = 'late-stream'
      const t = m.tally(d.scope.name)
      const call = rawRequest(server.port, {
        path: `/late-stream/${id}`,
        headers: { 'x-test-id': id },
      })
      await until(() => t.acquiresOf(id) === 1, 'the handler has its connection')
      call.req.destroy()
      await settled(d)
      t.stop()
      expect(t.releasesOf(id)).toBe(1)
      expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([])
      expect(d.pool.totalCount).toBe(d.pool.idleCount)
    })

    // The middleware's response is sent by Hono's chain: the body is dropped after it.
    if (m.kind === 'middleware')
      it('HEAD on a streaming route: the body is never read, the backstop still ends the unit of work', async () => {
        gate = deferred()
        const id = 'head'
        const t = m.tally(d.scope.name)
        const res = await fetch(`${server.url}/stream/${id}`, {
          method: 'HEAD',
          headers: { 'x-test-id': id },
        })
        expect(res.status).toBe(200)
        await until(() => t.releasesOf(id) === 1, 'released after the HEAD response')
        gate.resolve()
        await settled(d)
        t.stop()
        expect(await rowIds(d.url, 'SELECT id FROM items WHERE id LIKE $1', [`${id}-%`])).toEqual(
          [],
        )
        expect(d.pool.totalCount).toBe(d.pool.idleCount)
      })

    // scopedFetch(app) sees the response Hono made for HEAD, its body already dropped.
    if (m.kind === 'fetch')
      it('HEAD on a streaming route: Hono drops the body, the unit of work ends when the head is answered; the callback cannot use the session after', async () => {
        gate = deferred()
        const id = 'head'
        const t = m.tally(d.scope.name)
        const res = await fetch(`${server.url}/stream-abort/${id}`, {
          method: 'HEAD',
          headers: { 'x-test-id': id },
        })
        expect(res.status).toBe(200)
        await until(() => d.scope.stats().open === 0, 'the scope ended with the HEAD response')
        late = deferred()
        gate.resolve()
        const after = await late.promise
        expect(after).toBeInstanceOf(ScopedError)
        expect((after as ScopedError).code).toBe('SESSION_CLOSED')
        await settled(d)
        t.stop()
        expect(t.releasesOf(id)).toBe(t.acquiresOf(id))
        expect(t.releasesOf(id)).toBeLessThanOrEqual(1)
        expect(d.pool.totalCount).toBe(d.pool.idleCount)
      })
  })

  describe('a stream body that is already complete when the handler returns', () => {
    it('is committed before the response is sent, so a failed COMMIT is still a 500', async () => {
      const ok = await fetch(`${server.url}/finished-stream/ok/finished-ok`)
      expect(ok.status).toBe(200)
      expect(await rowIds(d.url, "SELECT id FROM items WHERE id = 'finished-ok'")).toEqual([
        'finished-ok',
      ])
      expect(await ok.text()).toBe('all of it')

      const bad = await fetch(`${server.url}/finished-stream/orphan/finished-orphan`)
      expect(bad.status).toBe(500)
      await bad.text()
      await settled(d)
      expect(await rowIds(d.url, "SELECT id FROM children WHERE id = 'finished-orphan'")).toEqual(
        [],
      )
      expect(d.pool.totalCount).toBe(d.pool.idleCount)
    })
  })
})
