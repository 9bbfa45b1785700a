/**
 * Session 4 review: adversarial probes of both entry points after the speed
 * rewrite (the synchronous fast path against the slow one). Each test asserts
 * what a user would check: the status and body the client got, the rows
 * committed or not, one release per request, an idle pool. Comments marked
 * "Was a bug" name what the review found (fixed the same day; each test
 * failed before its fix); the one `it.fails` is a documented limitation.
 */
import dc from 'node:diagnostics_channel'
import http from 'node:http'
import { SessionClosedError } from '@scoped/core'
import { Hono } from 'hono'
import { compress } from 'hono/compress'
import { setCookie } from 'hono/cookie'
import { HTTPException } from 'hono/http-exception'
import { methodOverride } from 'hono/method-override'
import { stream } from 'hono/streaming'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { scopedSession } from '../src/index.ts'
import {
  aborted,
  type Db,
  database,
  deferred,
  entries,
  listen,
  type Running,
  rawRequest,
  rowIds,
  settled,
  type Tally,
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

const encoder = new TextEncoder()
const quietLogger = { warn() {}, error() {} }
const bigPart = 1024 * 1024
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms))

/** Rows of `items` whose id starts with `prefix`, sorted. */
async function itemsLike(d: Db, prefix: string): Promise<string[]> {
  return await rowIds(d.url, 'SELECT id FROM items WHERE id LIKE $1 ORDER BY id', [`${prefix}%`])
}

describe.each(entries)('$title', (m) => {
  let d: Db
  let server: Running
  /** What app.onError saw, in order. */
  const answered: unknown[] = []
  /** Errors of work the handlers left behind, by test id. */
  const late = new Map<string, ReturnType<typeof deferred<unknown>>>()
  const lateOf = (id: string) => {
    let p = late.get(id)
    if (!p) {
      p = deferred<unknown>()
      late.set(id, p)
    }
    return p
  }
  /** Server-side request sockets by test id (for disconnects the test times itself). */
  const sockets = new Map<string, { destroy(): void }>()

  beforeAll(async () => {
    d = await database(m.db('review_s4'), { setup })
    const insert = (id: string) => d.db.query('INSERT INTO items (id) VALUES ($1)', [id])
    const app = new Hono()
    m.mount(app, d.scope)

    // A statement left running when the handler returns its response (not awaited).
    app.post('/floating/:id', (c) => {
      insert(c.req.param('id')).then(
        () => lateOf(c.req.param('id')).resolve('no error'),
        (e) => lateOf(c.req.param('id')).resolve(e),
      )
      return c.text('returned before the statement ended')
    })

    // A synchronous route that never queries, whose timer queries after the response.
    app.get('/timer-after/:id', (c) => {
      const id = c.req.param('id')
      setTimeout(() => {
        insert(id).then(
          () => lateOf(id).resolve('no error'),
          (e) => lateOf(id).resolve(e),
        )
      }, 20)
      return c.text('answered; the timer runs later')
    })

    // A statement whose error the handler caught: PostgreSQL turns the COMMIT into a ROLLBACK.
    app.post('/caught/:id', async (c) => {
      await insert(c.req.param('id'))
      await insert(c.req.param('id')).catch(() => undefined) // duplicate key, caught
      return c.text('the handler thinks all is well')
    })

    // app.onError that throws: the answer for the request is node-server's 500.
    app.post('/onerror-throws/:id', async (c) => {
      await insert(c.req.param('id'))
      throw new Error('onError will throw on this')
    })
    app.get('/onerror-throws-sync', () => {
      throw new Error('onError will throw on this')
    })

    // app.onError that queries (an audit row) in the request's unit of work.
    app.post('/onerror-queries/:id', async (c) => {
      await insert(c.req.param('id'))
      throw new Error('audit me')
    })

    // A JSON route for HEAD.
    app.get('/json/:id', async (c) => {
      await insert(c.req.param('id'))
      return c.json({ id: c.req.param('id') })
    })
    // A login: a session row, its cookie, then a COMMIT that fails.
    app.post('/login/:id', async (c) => {
      await d.db.query('INSERT INTO children (id, parent_id) VALUES ($1, 999)', [c.req.param('id')])
      setCookie(c, 'sid', c.req.param('id'))
      c.header('x-handler', 'was here')
      return c.json({ loggedIn: true })
    })
    app.get('/deferred/:id', async (c) => {
      await d.db.query('INSERT INTO children (id, parent_id) VALUES ($1, 999)', [c.req.param('id')])
      return c.json({ id: c.req.param('id') })
    })

    // Body streams that fail: at once (read ahead), or after a first part (live).
    app.post('/body-fails-now/:id', async (c) => {
      await insert(c.req.param('id'))
      return c.body(
        new ReadableStream({
          pull(ctl) {
            ctl.error(new Error('the body source failed'))
          },
        }),
      )
    })
    app.post('/body-fails-later/:id', async (c) => {
      await insert(c.req.param('id'))
      let n = 0
      return c.body(
        new ReadableStream({
          async pull(ctl) {
            if (n++ === 0) {
              ctl.enqueue(encoder.encode('first part\n'))
              return
            }
            await sleep(30)
            ctl.error(new Error('the body source failed later'))
          },
        }),
      )
    })

    // A pull-based body source that queries for each part (a cursor streamed out).
    app.get('/pull/:id', async (c) => {
      const id = c.req.param('id')
      await insert(`${id}-0`)
      let n = 0
      return c.body(
        new ReadableStream({
          async pull(ctl) {
            if (++n > 3) {
              ctl.close()
              return
            }
            try {
              await insert(`${id}-${n}`)
            } catch (e) {
              lateOf(id).resolve(e)
              throw e
            }
            ctl.enqueue(encoder.encode(`row ${n}\n`))
          },
        }),
      )
    })

    // The same, with parts large enough that a slow client pushes back (TCP backpressure).
    app.get('/pull-big/:id', async (c) => {
      const id = c.req.param('id')
      await insert(`${id}-0`)
      let n = 0
      return c.body(
        new ReadableStream({
          async pull(ctl) {
            if (++n > 4) {
              ctl.close()
              return
            }
            try {
              await insert(`${id}-${n}`)
            } catch (e) {
              lateOf(id).resolve(e)
              throw e
            }
            ctl.enqueue(new Uint8Array(bigPart).fill(120))
          },
        }),
      )
    })

    // The request's socket, for a disconnect timed by the test.
    app.post('/socket/:id', async (c) => {
      sockets.set(
        c.req.param('id'),
        (c.env as { incoming: { socket: { destroy(): void } } }).incoming.socket,
      )
      await insert(c.req.param('id'))
      return c.text('committed, then the socket is gone')
    })

    // Set after mounting: scopedFetch() follows a later onError.
    app.onError(async (err, c) => {
      answered.push(err)
      if (err.message === 'onError will throw on this') throw new Error('onError itself failed')
      if ((err as { code?: string }).code === '23503' && c.req.header('x-onerror-throws')) {
        throw new Error('onError failed while answering a failed COMMIT')
      }
      if (err.message === 'audit me') {
        await d.db.query('INSERT INTO items (id) VALUES ($1)', [
          `audit-${c.req.header('x-test-id')}`,
        ])
        return c.text(`audited in ${d.scope.getSession().name}`, 400)
      }
      if (err instanceof HTTPException) return err.getResponse()
      return c.text('Internal Server Error', 500)
    })
    server = await m.listen(app)
  })

  afterAll(async () => {
    await server?.close()
    await d?.close()
  })

  async function expectOneRelease(t: Tally, id: string, acquires = 1): Promise<void> {
    await settled(d)
    t.stop()
    expect(t.acquiresOf(id)).toBe(acquires)
    expect(t.releasesOf(id)).toBe(acquires)
    expect(d.pool.totalCount).toBe(d.pool.idleCount)
  }

  const post = (path: string, id: string, init: RequestInit = {}) =>
    fetch(`${server.url}${path}`, { method: 'POST', ...init, headers: { 'x-test-id': id } })

  it('a statement left running when the handler returned its response is committed before the response', async () => {
    const id = 'floating'
    const t = m.tally(d.scope.name)
    const observer = new pg.Client({ connectionString: d.url })
    await observer.connect()
    try {
      const res = await post(`/floating/${id}`, id)
      expect(res.status).toBe(200)
      // Visible the moment the client has the status line.
      expect((await observer.query('SELECT 1 FROM items WHERE id = $1', [id])).rowCount).toBe(1)
      await res.text()
    } finally {
      await observer.end()
    }
    expect(await lateOf(id).promise).toBe('no error')
    await expectOneRelease(t, id)
  })

  it('a route that took the fast path (no session): its timer that queries after the response fails loudly, checks nothing out', async () => {
    const id = 'timer-after'
    const before = d.scope.stats().totals.acquired
    const res = await fetch(`${server.url}/timer-after/${id}`, { headers: { 'x-test-id': id } })
    expect(res.status).toBe(200)
    await res.text()
    const error = await lateOf(id).promise
    expect(error).toBeInstanceOf(SessionClosedError)
    expect((error as Error).message).toMatch(/already ended/)
    await settled(d)
    expect(d.scope.stats().totals.acquired).toBe(before)
    expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([])
  })

  it('a statement error the handler caught: COMMIT became ROLLBACK, so the client gets a 500, not the 200', async () => {
    const id = 'caught'
    answered.length = 0
    const t = m.tally(d.scope.name)
    const res = await post(`/caught/${id}`, id)
    expect(res.status).toBe(500)
    expect(await res.text()).toBe('Internal Server Error')
    expect(String(answered[0])).toMatch(/COMMIT was turned into ROLLBACK/)
    expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([])
    await expectOneRelease(t, id)
  })

  it('app.onError that throws (async route): a 500, rolled back, one release', async () => {
    const id = 'onerror-throws'
    const t = m.tally(d.scope.name)
    const res = await post(`/onerror-throws/${id}`, id)
    expect(res.status).toBe(500)
    await res.text()
    expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([])
    await expectOneRelease(t, id)
  })

  it('app.onError that throws (synchronous route, no session): a 500, the scope ends, nothing checked out', async () => {
    const before = d.scope.stats().totals.acquired
    const res = await fetch(`${server.url}/onerror-throws-sync`)
    expect(res.status).toBe(500)
    await res.text()
    await settled(d)
    expect(d.scope.stats().totals.acquired).toBe(before)
    // The server still answers.
    const again = await fetch(`${server.url}/onerror-throws-sync`)
    expect(again.status).toBe(500)
    await again.text()
  })

  it("app.onError that queries runs in the request's session; by default its row rolls back with the rest", async () => {
    const id = 'onerror-queries'
    const t = m.tally(d.scope.name)
    const res = await post(`/onerror-queries/${id}`, id)
    expect(res.status).toBe(400)
    expect(await res.text()).toBe(
      `audited in ${m.kind === 'middleware' ? 'POST /onerror-queries/:id' : id}`,
    )
    expect(
      await rowIds(d.url, 'SELECT id FROM items WHERE id = ANY($1) ORDER BY id', [
        [id, `audit-${id}`],
      ]),
    ).toEqual([])
    await expectOneRelease(t, id)
  })

  it('app.onError that throws while answering a failed COMMIT: a 500, nothing stored, one release', async () => {
    const id = 'onerror-throws-on-commit'
    const t = m.tally(d.scope.name)
    const res = await fetch(`${server.url}/deferred/${id}`, {
      headers: { 'x-test-id': id, 'x-onerror-throws': '1' },
    })
    expect(res.status).toBe(500)
    await res.text()
    expect(await rowIds(d.url, 'SELECT id FROM children WHERE id = $1', [id])).toEqual([])
    await expectOneRelease(t, id)
  })

  // Was a bug (middleware only; fixed): the 500 for a failed COMMIT carries the headers the handler set
  // with c.header()/setCookie(). commitFailed() (scoped-session.ts:387) drops c.res, but Hono
  // keeps those headers in the Context's prepared headers (the very object c.json() used), and
  // app.onError's c.text() builds its answer from them: the client gets the cookie of a login
  // that was rolled back. scopedFetch() answers with a fresh Context and does not leak them.
  // Fix: clear the discarded response's headers before dropping it (for a response built by
  // c.json()/c.text() they are the Context's prepared headers): for (const k of
  // [...c.res.headers.keys()]) c.res.headers.delete(k).
  // Session 6: the 500 drops the headers that describe the body or claim what the response did
  // (content-*, ETag, Location, Set-Cookie, …) and keeps the others, as @scoped/express and
  // @scoped/fastify do, so CORS and request-id headers reach the client (review-s6): a plain
  // header the handler set (x-handler) is kept, as on Hono's own error path.
  it("a failed COMMIT's 500 carries none of the handler's claim headers (no Set-Cookie of a rolled-back login, no JSON content-type)", async () => {
    const id = 'login'
    const res = await post(`/login/${id}`, id)
    expect(res.status).toBe(500)
    expect(await res.text()).toBe('Internal Server Error')
    await settled(d)
    expect(await rowIds(d.url, 'SELECT id FROM children WHERE id = $1', [id])).toEqual([])
    expect(res.headers.getSetCookie()).toEqual([])
    expect(res.headers.get('content-type')).toMatch(/^text\/plain/)
    expect(res.headers.get('x-handler')).toBe('was here')
  })

  it('HEAD on a route that inserts and answers JSON: 200, no body, committed', async () => {
    const id = 'head-json'
    const t = m.tally(d.scope.name)
    const call = rawRequest(server.port, {
      method: 'HEAD',
      path: `/json/${id}`,
      headers: { 'x-test-id': id },
    })
    call.req.end()
    const done = await call.done
    expect(done).toEqual({ status: 200, body: '' })
    expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([id])
    await expectOneRelease(t, id)
  })

  it('HEAD on a route whose COMMIT fails: the head says 500, nothing stored', async () => {
    const id = 'head-deferred'
    const t = m.tally(d.scope.name)
    const call = rawRequest(server.port, {
      method: 'HEAD',
      path: `/deferred/${id}`,
      headers: { 'x-test-id': id },
    })
    call.req.end()
    const done = await call.done
    expect(done).toEqual({ status: 500, body: '' })
    expect(await rowIds(d.url, 'SELECT id FROM children WHERE id = $1', [id])).toEqual([])
    await expectOneRelease(t, id)
  })

  it('a body stream that fails on its first read: app.onError answers 500, rolled back, one release', async () => {
    const id = 'body-fails-now'
    const t = m.tally(d.scope.name)
    const res = await post(`/body-fails-now/${id}`, id)
    expect(res.status).toBe(500)
    expect(await res.text()).toBe('Internal Server Error')
    expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([])
    await expectOneRelease(t, id)
  })

  it('a body stream that fails after its first part: the client sees the response break off, rolled back', async () => {
    const id = 'body-fails-later'
    const t = m.tally(d.scope.name)
    const call = rawRequest(server.port, {
      method: 'POST',
      path: `/body-fails-later/${id}`,
      headers: { 'x-test-id': id },
      body: '',
    })
    const done = await call.done
    expect(done).toHaveProperty('error')
    expect(call.received()).toBe('first part\n')
    expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([])
    await expectOneRelease(t, id)
  })

  it('a pull-based body source that queries per part, read by a fast client: every part in the request session, committed', async () => {
    const id = 'pull'
    const t = m.tally(d.scope.name)
    const call = rawRequest(server.port, { path: `/pull/${id}`, headers: { 'x-test-id': id } })
    const done = await call.done
    expect(done).toEqual({ status: 200, body: 'row 1\nrow 2\nrow 3\n' })
    expect(await itemsLike(d, `${id}-`)).toEqual([`${id}-0`, `${id}-1`, `${id}-2`, `${id}-3`])
    await expectOneRelease(t, id)
  })

  // The next pull() is then started by the consumer's read after 'drain': it must still see the session.
  it('a pull-based body source that queries per part, read by a slow client: still in the request session, committed', async () => {
    const id = 'pull-big'
    const t = m.tally(d.scope.name)
    const got = await new Promise<{ status: number; bytes: number } | { error: Error }>(
      (resolve) => {
        const req = http.request({
          host: '127.0.0.1',
          port: server.port,
          path: `/pull-big/${id}`,
          headers: { 'x-test-id': id },
          agent: false,
        })
        req.on('error', (error) => resolve({ error }))
        req.on('response', (res) => {
          let bytes = 0
          res.pause()
          setTimeout(() => res.resume(), 300)
          res.on('data', (b: Buffer) => {
            bytes += b.length
            // A slow reader: pause after each piece, so the server's writes wait for 'drain'.
            res.pause()
            setTimeout(() => res.resume(), 2)
          })
          res.on('end', () => resolve({ status: res.statusCode ?? 0, bytes }))
          res.on('error', (error) => resolve({ error }))
          res.on('aborted', () => resolve({ error: new Error('response aborted') }))
        })
        req.end()
      },
    )
    await settled(d)
    t.stop()
    const failure = late.get(id)
    expect(failure ? String(await failure.promise) : 'no error').toBe('no error')
    expect(got).toEqual({ status: 200, bytes: 4 * bigPart })
    expect(await itemsLike(d, `${id}-`)).toEqual([0, 1, 2, 3, 4].map((n) => `${id}-${n}`))
  })

  it('a client whose connection is destroyed right after COMMIT, before the first byte: committed, one release, nothing reported', async () => {
    const id = 'gone-after-commit'
    d.reported.length = 0
    const t = m.tally(d.scope.name)
    const onCommit = (msg: any) => {
      if (msg.scope !== d.scope.name) return
      const name: string = msg.session.name
      if (msg.session.requestId === id || name === id) sockets.get(id)?.destroy()
    }
    dc.subscribe('scoped:commit', onCommit)
    try {
      const call = rawRequest(server.port, {
        method: 'POST',
        path: `/socket/${id}`,
        headers: { 'x-test-id': id },
        body: '',
      })
      const done = await call.done
      expect(done).toHaveProperty('error')
    } finally {
      dc.unsubscribe('scoped:commit', onCommit)
    }
    expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([id])
    await expectOneRelease(t, id)
    expect(d.reported).toEqual([])
    // The server goes on serving.
    const res = await post(`/json-none`, 'after')
    expect(res.status).toBe(404)
    await res.text()
  })
})

describe.each(entries)('$title: options that throw, sub-apps, re-dispatch', (m) => {
  let d: Db
  let server: Running
  const answered: unknown[] = []

  beforeAll(async () => {
    d = await database(m.db('review_s4_opts'), { setup })
    const insert = (id: string) => d.db.query('INSERT INTO items (id) VALUES ($1)', [id])
    const app = new Hono()
    app.onError((err, c) => {
      answered.push(err)
      if (err instanceof HTTPException) return err.getResponse()
      if (err.message.includes('400')) return c.text('bad request', 400)
      return c.text('Internal Server Error', 500)
    })
    // A commitOn with a bug, under /commit-throws only.
    m.mount(app, d.scope, {
      path: '/commit-throws/*',
      commitOn: () => {
        throw new Error('commitOn has a bug')
      },
    })
    m.mount(app, d.scope, { path: '/app/*' })
    // An async commitOn: its Promise is no answer (it would read as "do not commit").
    m.mount(app, d.scope, {
      path: '/commit-async/*',
      commitOn: (async () => true) as unknown as () => boolean,
    })
    app.post('/commit-async/:id', async (c) => {
      await insert(c.req.param('id'))
      return c.text('inserted', 201)
    })

    app.get('/commit-throws/none', (c) => c.text('never queried'))
    app.post('/commit-throws/insert/:id', async (c) => {
      await insert(c.req.param('id'))
      return c.text('inserted', 201)
    })
    app.post('/commit-throws/answered/:id', async (c) => {
      await insert(c.req.param('id'))
      throw new Error('answered with a 400')
    })

    // hono/method-override: an HTML form's POST with _method=DELETE is dispatched again, as a
    // new Request, through app.fetch.
    app.use('/app/posts/*', methodOverride({ app }))
    app.delete('/app/posts/:id', async (c) => {
      await insert(c.req.param('id'))
      throw new HTTPException(409, { message: 'conflict: the post is locked' })
    })

    // A sub-app with an onError of its own.
    const sub = new Hono()
    sub.onError((_err, c) => {
      // The workaround the README gives scopedFetch() users; harmless under the middleware.
      if (m.kind === 'fetch') d.scope.getSession().setRollbackOnly()
      return c.text('sub-app answer', 400)
    })
    sub.post('/thing/:id', async (c) => {
      await insert(c.req.param('id'))
      throw new Error('sub-app route failed')
    })
    app.route('/app/sub', sub)

    server = await m.listen(app)
  })

  afterAll(async () => {
    await server?.close()
    await d?.close()
  })

  it('a commitOn that throws, on a route that never queries: a 500, the scope ends, nothing checked out', async () => {
    const before = d.scope.stats().totals.acquired
    const res = await fetch(`${server.url}/commit-throws/none`)
    expect(res.status).toBe(500)
    expect(await res.text()).toBe('Internal Server Error')
    await settled(d)
    expect(d.scope.stats().totals.acquired).toBe(before)
  })

  it('a commitOn that throws, after an insert: a 500 answered by app.onError with its error, nothing stored, one release', async () => {
    const id = 'commit-throws-insert'
    answered.length = 0
    const t = m.tally(d.scope.name)
    const res = await fetch(`${server.url}/commit-throws/insert/${id}`, {
      method: 'POST',
      headers: { 'x-test-id': id },
    })
    expect(res.status).toBe(500)
    await res.text()
    expect(answered.map(String)).toEqual(['Error: commitOn has a bug'])
    expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([])
    await settled(d)
    t.stop()
    expect(t.releasesOf(id)).toBe(1)
    expect(d.pool.totalCount).toBe(d.pool.idleCount)
  })

  it('an async commitOn fails loudly: a 500 answered by app.onError with a TypeError that says why, nothing stored', async () => {
    const id = 'commit-async'
    answered.length = 0
    const res = await fetch(`${server.url}/commit-async/${id}`, {
      method: 'POST',
      headers: { 'x-test-id': id },
    })
    expect(res.status).toBe(500)
    await res.text()
    expect(answered.map(String)).toEqual([
      expect.stringMatching(
        /^TypeError: scoped(Session|Fetch)\(.*\{ commitOn \}\): commitOn must return true or false, got a Promise \(it cannot be async/,
      ),
    ])
    expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([])
    await settled(d)
    expect(d.pool.totalCount).toBe(d.pool.idleCount)
  })

  it('a commitOn that throws when asked about an answered Error: a 500, nothing stored, one release', async () => {
    const id = 'commit-throws-answered'
    const t = m.tally(d.scope.name)
    const res = await fetch(`${server.url}/commit-throws/answered/${id}`, {
      method: 'POST',
      headers: { 'x-test-id': id },
    })
    expect(res.status).toBe(500)
    await res.text()
    expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([])
    await settled(d)
    t.stop()
    expect(t.releasesOf(id)).toBe(1)
    expect(d.pool.totalCount).toBe(d.pool.idleCount)
  })

  it("an Error a sub-app's own onError answers with a 400 rolls back (scopedFetch: with the README's setRollbackOnly())", async () => {
    const id = 'sub-thing'
    const t = m.tally(d.scope.name)
    const res = await fetch(`${server.url}/app/sub/thing/${id}`, {
      method: 'POST',
      headers: { 'x-test-id': id },
    })
    expect(res.status).toBe(400)
    expect(await res.text()).toBe('sub-app answer')
    expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([])
    await settled(d)
    t.stop()
    expect(t.releasesOf(id)).toBe(1)
    expect(d.pool.totalCount).toBe(d.pool.idleCount)
  })

  // Was a bug (scopedFetch only; fixed): an Error thrown in a request that hono/method-override dispatched
  // again is not seen, so a 4xx answer commits. scopedFetch() finds the request's lifecycle
  // through a symbol on the Request object (scoped-fetch.ts:202, read at scoped-fetch.ts:92);
  // methodOverride() calls app.fetch(new Request(...), c.env) (any re-dispatch does), so the
  // wrapped error handler finds no lifecycle for the new Request and never marks the unit of
  // work; returned() then judges the 409 by status alone (scoped-fetch.ts:241, 250) and
  // COMMITs the row of a handler that threw. The session itself is the outer request's (the
  // inner fetch runs inside its scope), so the row is written in the committed unit of work.
  it('hono/method-override: an Error thrown by the overridden DELETE route rolls back', async () => {
    const id = 'override-delete'
    const res = await fetch(`${server.url}/app/posts/${id}`, {
      method: 'POST',
      headers: { 'x-test-id': id, 'content-type': 'application/x-www-form-urlencoded' },
      body: '_method=DELETE',
    })
    expect(res.status).toBe(409)
    await res.text()
    await settled(d)
    expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([])
    expect(d.pool.totalCount).toBe(d.pool.idleCount)
  })
})

/** Two scopes on one request: A outside (the middleware or scopedFetch), B a middleware inside it. */
describe.each(entries)('$title: a second scope inside (scopedSession(B))', (m) => {
  let a: Db
  let b: Db
  let server: Running

  beforeAll(async () => {
    a = await database(m.db('review_s4_a'), { setup })
    b = await database(m.db('review_s4_b'), { setup })
    const app = new Hono()
    app.onError((_err, c) => c.text('Internal Server Error', 500))
    m.mount(app, a.scope)
    app.use(scopedSession(b.scope))
    app.post('/both/:id', async (c) => {
      const id = c.req.param('id')
      await a.db.query('INSERT INTO items (id) VALUES ($1)', [id])
      await b.db.query('INSERT INTO items (id) VALUES ($1)', [id])
      return c.text('both', 201)
    })
    // B's COMMIT fails (deferred constraint): A must not commit either.
    app.post('/b-fails/:id', async (c) => {
      const id = c.req.param('id')
      await a.db.query('INSERT INTO items (id) VALUES ($1)', [id])
      await b.db.query('INSERT INTO children (id, parent_id) VALUES ($1, 999)', [id])
      return c.text('B will fail at COMMIT')
    })
    // A streamed body that queries both scopes: both wrap the body, both commit at its end.
    app.get('/stream-both/:id', (c) =>
      stream(c, async (s) => {
        const id = c.req.param('id')
        await s.write('a\n')
        await a.db.query('INSERT INTO items (id) VALUES ($1)', [id])
        await sleep(10)
        await b.db.query('INSERT INTO items (id) VALUES ($1)', [id])
        await s.write('b\n')
      }),
    )
    app.get('/stream-b-fails/:id', (c) =>
      stream(c, async (s) => {
        const id = c.req.param('id')
        await s.write('a\n')
        await a.db.query('INSERT INTO items (id) VALUES ($1)', [id])
        await sleep(10)
        await b.db.query('INSERT INTO children (id, parent_id) VALUES ($1, 999)', [id])
        await s.write('b\n')
      }),
    )
    // Only B queries: A (outside) never checks out, on its fast path.
    app.post('/only-b/:id', async (c) => {
      await b.db.query('INSERT INTO items (id) VALUES ($1)', [c.req.param('id')])
      return c.text('only B')
    })
    server = await m.listen(app)
  })

  afterAll(async () => {
    await server?.close()
    await a?.close()
    await b?.close()
  })

  const post = (path: string, id: string) =>
    fetch(`${server.url}${path}`, { method: 'POST', headers: { 'x-test-id': id } })
  const stored = (d: Db, table: string, id: string) =>
    rowIds(d.url, `SELECT id FROM ${table} WHERE id = $1`, [id])

  it('both units of work commit before the response', async () => {
    const res = await post('/both/x1', 'x1')
    expect(res.status).toBe(201)
    // Visible in both databases the moment the client has the status.
    expect(await stored(a, 'items', 'x1')).toEqual(['x1'])
    expect(await stored(b, 'items', 'x1')).toEqual(['x1'])
    await res.text()
    await settled(a)
    await settled(b)
  })

  it("the inner scope's failed COMMIT is a 500 and the outer scope rolls back", async () => {
    const res = await post('/b-fails/x2', 'x2')
    expect(res.status).toBe(500)
    await res.text()
    await settled(a)
    await settled(b)
    expect(await stored(a, 'items', 'x2')).toEqual([])
    expect(await stored(b, 'children', 'x2')).toEqual([])
  })

  it('a streamed body that queries both scopes: both commit before the end reaches the client', async () => {
    const call = rawRequest(server.port, {
      path: '/stream-both/s1',
      headers: { 'x-test-id': 's1' },
    })
    expect(await call.done).toEqual({ status: 200, body: 'a\nb\n' })
    expect(await stored(a, 'items', 's1')).toEqual(['s1'])
    expect(await stored(b, 'items', 's1')).toEqual(['s1'])
    await settled(a)
    await settled(b)
  })

  it("a streamed body whose inner scope's COMMIT fails: cut off, the outer scope rolls back", async () => {
    const call = rawRequest(server.port, {
      path: '/stream-b-fails/s2',
      headers: { 'x-test-id': 's2' },
    })
    expect(await call.done).toHaveProperty('error')
    await settled(a)
    await settled(b)
    expect(await stored(a, 'items', 's2')).toEqual([])
    expect(await stored(b, 'children', 's2')).toEqual([])
  })

  it('a request that only uses the inner scope checks nothing out of the outer one', async () => {
    const before = a.scope.stats().totals.acquired
    const res = await post('/only-b/x3', 'x3')
    expect(res.status).toBe(200)
    await res.text()
    await settled(a)
    await settled(b)
    expect(a.scope.stats().totals.acquired).toBe(before)
    expect(await stored(b, 'items', 'x3')).toEqual(['x3'])
  })
})

describe.each(entries)('$title: uploads, reporters, responses replaced', (m) => {
  let d: Db
  let server: Running
  const reporterCalls: string[] = []
  const uploadFailed = deferred<unknown>()
  const uploadEntered = deferred()

  beforeAll(async () => {
    d = await database(m.db('review_s4_up'), {
      setup,
      scope: {
        // A reporter with a bug of its own.
        onError: (_error, { during }) => {
          reporterCalls.push(during)
          throw new Error('the scope onError reporter failed')
        },
      },
    })
    const insert = (id: string) => d.db.query('INSERT INTO items (id) VALUES ($1)', [id])
    const app = new Hono()
    app.onError((_err, c) => c.text('Internal Server Error', 500))
    m.mount(app, d.scope)

    // A chunked upload, stored part by part as it arrives.
    app.post('/upload/:id', async (c) => {
      const id = c.req.param('id')
      const reader = c.req.raw.body!.getReader()
      let n = 0
      try {
        for (;;) {
          const { done } = await reader.read()
          if (done) break
          await insert(`${id}-${++n}`)
          if (n === 2) uploadEntered.resolve()
        }
      } catch (e) {
        uploadFailed.resolve(e)
        throw e
      }
      uploadFailed.resolve('no error')
      return c.text(`stored ${n} parts`)
    })

    // A later middleware replaces the response with one whose body is piped through a transform.
    app.use('/wrapped/*', async (c, next) => {
      await next()
      const res = c.res
      c.res = undefined
      c.res = new Response(res.body!.pipeThrough(new TransformStream()), res)
    })
    app.post('/wrapped/:id', async (c) => {
      await insert(c.req.param('id'))
      return c.json({ id: c.req.param('id') })
    })
    app.post('/wrapped/deferred/:id', async (c) => {
      await d.db.query('INSERT INTO children (id, parent_id) VALUES ($1, 999)', [c.req.param('id')])
      return c.json({ id: c.req.param('id') })
    })

    // A streamed body whose COMMIT fails: reported through the (failing) scope reporter.
    app.get('/stream-deferred/:id', (c) =>
      stream(c, async (s) => {
        await s.write('part\n')
        await d.db.query('INSERT INTO children (id, parent_id) VALUES ($1, 999)', [
          c.req.param('id'),
        ])
        await sleep(10)
        await s.write('end\n')
      }),
    )
    server = await m.listen(app)
  })

  afterAll(async () => {
    await server?.close()
    await d?.close()
  })

  it('a chunked upload stored as it arrives, aborted mid-body: nothing stored, one release', async () => {
    const id = 'chunked'
    const t = m.tally(d.scope.name)
    const call = rawRequest(server.port, {
      method: 'POST',
      path: `/upload/${id}`,
      headers: { 'x-test-id': id, 'transfer-encoding': 'chunked' },
    })
    call.req.write('a'.repeat(1000))
    await sleep(20)
    call.req.write('b'.repeat(1000))
    await uploadEntered.promise
    call.req.write('c'.repeat(1000))
    call.req.destroy()
    expect(await uploadFailed.promise).toBeInstanceOf(Error)
    expect(await call.done).toHaveProperty('error')
    await settled(d)
    t.stop()
    expect(await itemsLike(d, `${id}-`)).toEqual([])
    expect(t.acquiresOf(id)).toBe(1)
    expect(t.releasesOf(id)).toBe(1)
    expect(d.pool.totalCount).toBe(d.pool.idleCount)
  })

  it('a response a later middleware replaced (body piped through a transform): committed before it is sent', async () => {
    const id = 'wrapped'
    const res = await fetch(`${server.url}/wrapped/${id}`, {
      method: 'POST',
      headers: { 'x-test-id': id },
    })
    expect(res.status).toBe(200)
    expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([id])
    expect(await res.json()).toEqual({ id })
    await settled(d)
  })

  it('a response a later middleware replaced, whose COMMIT fails: the client never gets a clean 200', async () => {
    const id = 'wrapped-deferred'
    const call = rawRequest(server.port, {
      method: 'POST',
      path: `/wrapped/deferred/${id}`,
      headers: { 'x-test-id': id },
      body: '',
    })
    const done = await call.done
    if ('status' in done) expect(done.status).toBe(500)
    else expect(done.error).toBeInstanceOf(Error)
    await settled(d)
    expect(await rowIds(d.url, 'SELECT id FROM children WHERE id = $1', [id])).toEqual([])
  })

  it('a scope onError reporter that throws: a streamed response whose COMMIT fails is still cut off, one release, nothing unhandled', async () => {
    const id = 'reporter-throws'
    reporterCalls.length = 0
    const t = m.tally(d.scope.name)
    const call = rawRequest(server.port, {
      path: `/stream-deferred/${id}`,
      headers: { 'x-test-id': id },
    })
    const done = await call.done
    // Every part went out (no Content-Length: only the end is held back), the end never did.
    expect(done).toHaveProperty('error')
    expect(call.received()).toBe('part\nend\n')
    await settled(d)
    t.stop()
    expect(reporterCalls.some((during) => during.startsWith('COMMIT of'))).toBe(true)
    expect(await rowIds(d.url, 'SELECT id FROM children WHERE id = $1', [id])).toEqual([])
    expect(t.releasesOf(id)).toBe(1)
    expect(d.pool.totalCount).toBe(d.pool.idleCount)
  })
})

/** A table whose COMMIT takes 300 ms (a deferred constraint trigger sleeps): a status line sent before it shows. */
const slowCommit = `
  CREATE TABLE slow_items (id text PRIMARY KEY);
  CREATE FUNCTION slow_check() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$;
  CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON slow_items
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_check();
`

describe('scopedSession(): hono/compress mounted before it (outside the scope)', () => {
  let d: Db
  let server: Running

  beforeAll(async () => {
    d = await database('hono_review_s4_gzip_outside', { setup: setup + slowCommit })
    const app = new Hono()
    app.use(compress())
    app.use(scopedSession(d.scope))
    app.post('/gzip-slow/:id', async (c) => {
      await d.db.query('INSERT INTO slow_items (id) VALUES ($1)', [c.req.param('id')])
      return c.json({ id: c.req.param('id'), big: 'x'.repeat(4096) }, 201)
    })
    server = await listen(app)
  })

  afterAll(async () => {
    await server?.close()
    await d?.close()
  })

  it('a compressed 201 after a slow COMMIT: the row is visible the moment the client has the status', async () => {
    const id = 'gzip-outside'
    const res = await fetch(`${server.url}/gzip-slow/${id}`, {
      method: 'POST',
      headers: { 'accept-encoding': 'gzip' },
    })
    expect(res.status).toBe(201)
    expect(res.headers.get('content-encoding')).toBe('gzip')
    const visible = await rowIds(d.url, 'SELECT id FROM slow_items WHERE id = $1', [id])
    await res.arrayBuffer()
    await settled(d)
    expect(visible).toEqual([id])
  })
})

describe.each(entries)('$title: hono/compress inside the scope', (m) => {
  let d: Db
  let server: Running
  const big = 'x'.repeat(4096)

  beforeAll(async () => {
    d = await database(m.db('review_s4_gzip'), { setup: setup + slowCommit })
    const app = new Hono()
    app.onError((_err, c) => c.text('Internal Server Error', 500))
    // scopedFetch(app) has the whole app inside the scope; the middleware is mounted first here.
    m.mount(app, d.scope)
    app.use(compress())
    app.post('/gzip/:id', async (c) => {
      await d.db.query('INSERT INTO items (id) VALUES ($1)', [c.req.param('id')])
      return c.json({ id: c.req.param('id'), big }, 201)
    })
    app.post('/gzip-slow/:id', async (c) => {
      await d.db.query('INSERT INTO slow_items (id) VALUES ($1)', [c.req.param('id')])
      return c.json({ id: c.req.param('id'), big }, 201)
    })
    app.post('/small-slow/:id', async (c) => {
      await d.db.query('INSERT INTO slow_items (id) VALUES ($1)', [c.req.param('id')])
      return c.json({ id: c.req.param('id') }, 201)
    })
    app.post('/gzip-deferred/:id', async (c) => {
      await d.db.query('INSERT INTO children (id, parent_id) VALUES ($1, 999)', [c.req.param('id')])
      return c.json({ id: c.req.param('id'), big })
    })
    server = await m.listen(app)
  })

  afterAll(async () => {
    await server?.close()
    await d?.close()
  })

  it('a compressed JSON response of a unit of work that commits: 201, committed, the client decodes the body', async () => {
    const id = 'gzip-ok'
    const res = await fetch(`${server.url}/gzip/${id}`, {
      method: 'POST',
      headers: { 'x-test-id': id, 'accept-encoding': 'gzip' },
    })
    expect(res.status).toBe(201)
    expect(res.headers.get('content-encoding')).toBe('gzip')
    expect(await res.json()).toEqual({ id, big })
    expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([id])
    await settled(d)
  })

  // Was a bug (fixed): compress() inside the scope (always so with scopedFetch(app), which has the whole app
  // inside; with the middleware, when compress() is mounted after it) turns every response it
  // compresses (any compressible type without a Content-Length, which c.json()/c.text() never
  // set, or over 1 KiB) into a "live" body: its CompressionStream delivers through zlib's
  // thread pool, so the read-ahead in inspectBody() (response-body.ts:464, soon(): one
  // setImmediate turn) takes it for a body still being produced. The status line then goes
  // out BEFORE the COMMIT (liveResponse, request-lifecycle.ts:180): a failed COMMIT is a 200
  // cut off mid-body instead of a 500, and a client holding a 201 may not see its row yet.
  it('a compressed JSON response whose COMMIT fails is a 500 (committed before the status line)', async () => {
    const id = 'gzip-deferred'
    const call = rawRequest(server.port, {
      method: 'POST',
      path: `/gzip-deferred/${id}`,
      headers: { 'x-test-id': id, 'accept-encoding': 'gzip' },
      body: '',
    })
    const done = await call.done
    await settled(d)
    expect(await rowIds(d.url, 'SELECT id FROM children WHERE id = $1', [id])).toEqual([])
    expect(done).toMatchObject({ status: 500 })
  })
  it('a 201 after a slow COMMIT, not compressed (accept-encoding: identity): the row is visible the moment the client has the status', async () => {
    const id = 'small-slow'
    const res = await fetch(`${server.url}/small-slow/${id}`, {
      method: 'POST',
      headers: { 'x-test-id': id, 'accept-encoding': 'identity' },
    })
    expect(res.status).toBe(201)
    expect(res.headers.get('content-encoding')).toBeNull()
    const visible = await rowIds(d.url, 'SELECT id FROM slow_items WHERE id = $1', [id])
    expect(await res.json()).toEqual({ id })
    await settled(d)
    expect(visible).toEqual([id])
  })

  // The same bug, seen as a client would: the 201 arrives while the COMMIT still runs.
  it('a compressed 201: the row is visible the moment the client has the status', async () => {
    const id = 'gzip-slow'
    const res = await fetch(`${server.url}/gzip-slow/${id}`, {
      method: 'POST',
      headers: { 'x-test-id': id, 'accept-encoding': 'gzip' },
    })
    expect(res.status).toBe(201)
    expect(res.headers.get('content-encoding')).toBe('gzip')
    const visible = await rowIds(d.url, 'SELECT id FROM slow_items WHERE id = $1', [id])
    await res.arrayBuffer()
    await settled(d)
    expect(visible).toEqual([id])
  })
})

// Each its own database: the connection a failing probe leaks stays checked out until the scope closes.
describe.each(entries)('$title: a body nobody reads (client gone)', (m) => {
  let d: Db
  let server: Running
  const signals = new Map<string, ReturnType<typeof deferred<unknown>>>()
  const late = (key: string) => {
    let p = signals.get(key)
    if (!p) {
      p = deferred<unknown>()
      signals.set(key, p)
    }
    return p
  }

  beforeAll(async () => {
    d = await database(m.db('review_s4_unread'), { setup, scope: { logger: quietLogger } })
    const insert = (id: string) => d.db.query('INSERT INTO items (id) VALUES ($1)', [id])
    const app = new Hono()
    app.onError((_err, c) => c.text('Internal Server Error', 500))
    m.mount(app, d.scope)
    // A middleware after ours that waits (an audit call, say) after the handler returned a stream
    // whose callback streams rows inside one tracked use() (the cursor pattern); the test
    // makes the client leave during that wait.
    app.use('/late-abort/*', async (c, next) => {
      await next()
      late(`${c.req.param('id') ?? c.req.path.split('/').pop()}-returned`).resolve('returned')
      await aborted(d.scope.getSession().signal)
    })
    app.get('/late-abort/:id', async (c) => {
      const id = c.req.param('id')
      await insert(id)
      return stream(c, (s) =>
        d.scope.getSession().use(async (client) => {
          for (let i = 0; i < 8; i++) {
            await client.query('SELECT 1')
            await s.write(new Uint8Array(64 * 1024).fill(97))
          }
          late(id).resolve('callback done')
        }),
      )
    })

    server = await m.listen(app)
  })

  afterAll(async () => {
    await server?.close()
    await d?.close()
  })

  // Was a bug (fixed): a response body nobody will ever read is never cancelled, so a stream() callback that
  // writes inside a tracked use() blocks forever and the connection is never released. When
  // the client left before the chain settled, settleSlowly() only rolls back
  // (scoped-session.ts:427-430, scoped-fetch.ts:284-288): rollback waits for the running use()
  // (Session.close waits for tracked work), the use() waits on s.write(), and s.write() waits
  // for a reader that never comes: node-server does not read or cancel the body of a response
  // whose socket is already destroyed (writeFromReadableStream returns at once). Fix: in the
  // aborted branch (and in #gone/liveResponse's closedEarly path), cancel the response body
  // (c.res.body / res.body .cancel()), which makes Hono's StreamingApi abort and its pending
  // writes return, before awaiting the rollback.
  it('a client gone before the chain settled, a stream() callback writing inside use(): the connection is released', async () => {
    const id = 'late-abort'
    const call = rawRequest(server.port, {
      path: `/late-abort/${id}`,
      headers: { 'x-test-id': id },
    })
    await late(`${id}-returned`).promise
    call.req.destroy()
    await call.done
    await until(() => d.scope.stats().open === 0, 'the unit of work ended', 3_000)
    await until(() => d.pool.totalCount === d.pool.idleCount, 'the pool is idle', 3_000)
    expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([])
  })
})

describe.each(entries)('$title: a body nobody reads (HEAD)', (m) => {
  let d: Db
  let server: Running

  beforeAll(async () => {
    d = await database(m.db('review_s4_head'), { setup, scope: { logger: quietLogger } })
    const insert = (id: string) => d.db.query('INSERT INTO items (id) VALUES ($1)', [id])
    const app = new Hono()
    app.onError((_err, c) => c.text('Internal Server Error', 500))
    m.mount(app, d.scope)
    // A GET route whose stream() callback writes rows inside one tracked use().
    app.get('/head-stream/:id', async (c) => {
      const id = c.req.param('id')
      await insert(id)
      return stream(c, (s) =>
        d.scope.getSession().use(async (client) => {
          // More than any socket buffer holds: the body can only end early through a cancel,
          // so a client gone mid-body is always seen before the last write (no race with a
          // body that was written out in full and committed).
          for (let i = 0; i < 4096 && !s.aborted; i++) {
            await client.query('SELECT 1')
            await s.write(new Uint8Array(64 * 1024).fill(97))
          }
        }),
      )
    })
    server = await m.listen(app)
  })

  afterAll(async () => {
    await server?.close()
    await d?.close()
  })

  it('GET on the same route, the client gone mid-body: the writes stop blocking, rolled back, one release', async () => {
    const id = 'get-stream-gone'
    const t = m.tally(d.scope.name)
    const call = rawRequest(server.port, {
      path: `/head-stream/${id}`,
      headers: { 'x-test-id': id },
    })
    await until(() => call.received().length > 0, 'the first bytes arrived', 3_000)
    call.req.destroy()
    await until(() => t.releasesOf(id) === 1, 'released', 3_000)
    t.stop()
    expect(t.acquiresOf(id)).toBe(1)
    expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([])
  })

  // Known limitation (scopedFetch only; hono README, "HEAD"): HEAD on a route whose stream() callback writes inside use() never
  // gets its answer, and the connection is never released. Hono answers HEAD with
  // new Response(null, getResponse), dropping the GET body without cancelling it, so
  // scopedFetch() sees a finished head and ends the unit of work at once (returned(),
  // scoped-fetch.ts:259: life.end(commit).then(() => res)); the end waits for the running
  // use(), the use() waits on s.write(), and nothing ever reads or cancels that body. The
  // middleware sees the GET response, wraps the live body, and its 'close' backstop cancels
  // the source (request-lifecycle.ts:233), which unblocks the writes. Fix: for HEAD,
  // scopedFetch() must reach the GET body to cancel it (e.g. dispatch HEAD itself: run
  // app.fetch with the GET response kept, cancel its body, answer new Response(null, res)).
  ;(m.kind === 'fetch' ? it.fails : it)(
    'HEAD on a route whose stream() callback writes inside use(): answered, the connection released',
    async () => {
      const id = 'head-stream'
      const call = rawRequest(server.port, {
        method: 'HEAD',
        path: `/head-stream/${id}`,
        headers: { 'x-test-id': id },
      })
      call.req.end()
      const done = await Promise.race([call.done, sleep(3_000).then(() => 'no answer')])
      call.req.destroy()
      expect(done).toEqual({ status: 200, body: '' })
      await until(() => d.scope.stats().open === 0, 'the unit of work ended', 3_000)
      await until(() => d.pool.totalCount === d.pool.idleCount, 'the pool is idle', 3_000)
    },
  )
})
