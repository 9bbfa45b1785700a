/**
 * Session 5 review probes (adversarial): real servers on 127.0.0.1, real
 * sockets (node:http, node:http2, net), real PostgreSQL. A test marked
 * `it.fails` asserts the correct behaviour of a bug the review found (its
 * `// BUG:` line says what happens and what should); the others are
 * regression tests of guarantees that hold.
 */
import http from 'node:http'
import http2 from 'node:http2'
import net from 'node:net'
import { Readable } from 'node:stream'
import { SessionClosedError } from '@scoped/core'
import Fastify, { type FastifyInstance, type FastifyServerOptions } from 'fastify'
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { scopedSession } from '../src/index.ts'
import {
  committed,
  expectSettled,
  gate,
  type Harness,
  harness,
  listen,
  waitFor,
} from './support.ts'

let h: Harness
const apps: FastifyInstance[] = []

beforeAll(async () => {
  h = await harness('fastify_review_s5', { max: 5 })
  await h.independent.query('CREATE TABLE items (id text PRIMARY KEY)')
  await h.independent.query('CREATE TABLE parents (id int PRIMARY KEY)')
  await h.independent.query(
    'CREATE TABLE children (id text PRIMARY KEY, parent int REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)',
  )
})

const h2sessions: http2.ClientHttp2Session[] = []
afterEach(async () => {
  for (const s of h2sessions.splice(0)) s.destroy()
  await Promise.all(apps.splice(0).map((a) => a.close()))
})

function h2connect(base: string): http2.ClientHttp2Session {
  const session = http2.connect(base)
  session.on('error', () => {})
  h2sessions.push(session)
  return session
}

afterAll(async () => {
  await h.close()
})

let released = 0
beforeEach(() => {
  released = h.releases()
})

const insert = (id: string) => h.db.query('INSERT INTO items (id) VALUES ($1)', [id])
/** Succeeds now, fails at COMMIT: the parent does not exist and the check is deferred. */
const insertOrphan = (id: string) =>
  h.db.query('INSERT INTO children (id, parent) VALUES ($1, 999)', [id])

async function exists(table: 'items' | 'children', id: string): Promise<boolean> {
  return (await committed(h, `SELECT 1 FROM ${table} WHERE id = $1`, [id])).length === 1
}

/** Resolves once a statement of the pool's backends is running pg_sleep. */
function sleeping(): Promise<void> {
  return waitFor('pg_sleep to run on the server', async () => {
    const { rows } = await h.independent.query(
      "SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = $1 AND state = 'active' AND query LIKE '%pg_sleep%'",
      [h.app],
    )
    return rows[0].n > 0
  })
}

/** The error code of a statement, or 'completed'. */
async function outcome(p: Promise<unknown>): Promise<string> {
  try {
    await p
    return 'completed'
  } catch (e) {
    const code = (e as { code?: unknown }).code
    return typeof code === 'string' && /^[0-9A-Z]{5}$/.test(code) ? code : (e as Error).name
  }
}

async function app(
  setup: (app: FastifyInstance) => void | Promise<void>,
  options: FastifyServerOptions & { http2?: boolean } = {},
  plugin: { cancelOnAbort?: boolean } = {},
) {
  const a = Fastify(options as FastifyServerOptions)
  apps.push(a as FastifyInstance)
  await a.register(scopedSession, { scope: h.scope, ...plugin })
  await setup(a as FastifyInstance)
  const { base, port } = await listen(a as FastifyInstance)
  return { app: a as FastifyInstance, base, port }
}

interface Raw {
  status: number | undefined
  headers: http.IncomingHttpHeaders
  body: string
  ended: 'complete' | 'error'
}

function raw(
  port: number,
  path: string,
  opts: { method?: string; headers?: Record<string, string> } = {},
): Promise<Raw> {
  return new Promise((resolve) => {
    let result: Raw = { status: undefined, headers: {}, body: '', ended: 'error' }
    let done = false
    const finish = (ended: Raw['ended']) => {
      if (done) return
      done = true
      resolve({ ...result, ended })
    }
    const req = http.request({
      host: '127.0.0.1',
      port,
      path,
      method: opts.method ?? 'GET',
      headers: opts.headers,
      agent: false,
    })
    req.on('response', (res) => {
      result = { status: res.statusCode, headers: res.headers, body: '', ended: 'error' }
      res.setEncoding('latin1')
      res.on('data', (c: string) => {
        result.body += c
      })
      res.on('end', () => finish(res.complete ? 'complete' : 'error'))
      res.on('error', () => finish('error'))
      res.on('aborted', () => finish('error'))
    })
    req.on('error', () => finish('error'))
    req.end()
  })
}

// ── HTTP/2 (h2c) ──────────────────────────────────────────────────────────

interface H2Result {
  status: number | undefined
  headers: http2.IncomingHttpHeaders
  body: string
  /** 'complete': the stream ended cleanly; 'error': reset or errored. */
  ended: 'complete' | 'error'
  /** When the response headers arrived: was the row committed then? */
  visibleAtHeaders?: boolean
}

function h2request(
  session: http2.ClientHttp2Session,
  path: string,
  opts: { method?: string; checkAtHeaders?: () => Promise<boolean> } = {},
): { stream: http2.ClientHttp2Stream; done: Promise<H2Result> } {
  const stream = session.request({ ':path': path, ':method': opts.method ?? 'GET' })
  const result: H2Result = { status: undefined, headers: {}, body: '', ended: 'error' }
  const done = new Promise<H2Result>((resolve) => {
    let checking: Promise<void> = Promise.resolve()
    let settled = false
    const finish = (ended: H2Result['ended']) => {
      if (settled) return
      settled = true
      void checking.then(() => resolve({ ...result, ended }))
    }
    stream.on('response', (headers) => {
      result.status = headers[':status'] as number
      result.headers = headers
      if (opts.checkAtHeaders) {
        stream.pause()
        checking = opts.checkAtHeaders().then((v) => {
          result.visibleAtHeaders = v
          stream.resume()
        })
      }
    })
    stream.setEncoding('utf8')
    stream.on('data', (c: string) => {
      result.body += c
    })
    stream.on('end', () => {
      // A stream reset by the server after data still emits 'end' on some paths: check the code.
      if (stream.rstCode !== undefined && stream.rstCode !== http2.constants.NGHTTP2_NO_ERROR) {
        finish('error')
      } else finish('complete')
    })
    stream.on('error', () => finish('error'))
    stream.on('close', () => {
      if (stream.rstCode !== http2.constants.NGHTTP2_NO_ERROR) finish('error')
      else finish('complete')
    })
  })
  stream.end()
  return { stream, done }
}

describe('HTTP/2 (h2c)', () => {
  it('each stream is its own unit of work: committed before its headers, a failed COMMIT is a 500, one release each', async () => {
    const { base } = await app(
      (a) => {
        a.post('/ok/:id', async (request, reply) => {
          await insert((request.params as { id: string }).id)
          return reply.code(201).send({ ok: true })
        })
        a.post('/orphan/:id', async (request) => {
          await insertOrphan((request.params as { id: string }).id)
          return { ok: true }
        })
      },
      { http2: true },
    )
    const session = h2connect(base)
    try {
      const results = await Promise.all([
        ...['h2-a', 'h2-b', 'h2-c'].map(
          (id) =>
            h2request(session, `/ok/${id}`, {
              method: 'POST',
              checkAtHeaders: () => exists('items', id),
            }).done,
        ),
        h2request(session, '/orphan/h2-d', { method: 'POST' }).done,
      ])
      expect(results.map((r) => [r.status, r.ended, r.visibleAtHeaders])).toEqual([
        [201, 'complete', true],
        [201, 'complete', true],
        [201, 'complete', true],
        [500, 'complete', undefined],
      ])
      await expectSettled(h)
      expect(h.releases() - released).toBe(4)
      expect(await exists('children', 'h2-d')).toBe(false)
    } finally {
      session.destroy()
    }
  })

  for (const how of ['RST_STREAM (stream.close(CANCEL))', 'session destroyed'] as const) {
    it(`a client that leaves mid-handler by ${how}: the next statement fails, rollback, one release; other streams of the session unaffected`, async () => {
      const started = gate()
      const go = gate()
      const next = gate<string>()
      const { base } = await app(
        (a) => {
          a.post('/slow/:id', async (request) => {
            const { id } = request.params as { id: string }
            await insert(id)
            started.open()
            await go.promise
            next.open(await outcome(insert(`${id}-after`)))
            return { ok: true }
          })
          a.post('/fast/:id', async (request) => {
            await insert((request.params as { id: string }).id)
            return { ok: true }
          })
        },
        { http2: true },
      )
      const session = h2connect(base)
      const id = how === 'session destroyed' ? 'h2-gone-s' : 'h2-gone-r'
      const slow = h2request(session, `/slow/${id}`, { method: 'POST' })
      slow.stream.on('error', () => {})
      await started.promise
      if (how === 'session destroyed') session.destroy()
      else {
        // Another stream on the same session is answered and committed meanwhile.
        const fast = await h2request(session, `/fast/${id}-other`, { method: 'POST' }).done
        expect(fast.status).toBe(200)
        slow.stream.close(http2.constants.NGHTTP2_CANCEL)
      }
      await waitFor('the server to see the stream gone', () => h.scope.stats().open === 1)
      // Give the server's 'close' a chance to arrive before the handler goes on.
      await new Promise((r) => setTimeout(r, 50))
      go.open()
      expect(await next.promise).toBe('ScopeAbortedError')
      await expectSettled(h)
      expect(h.releases() - released).toBe(how === 'session destroyed' ? 1 : 2)
      expect(await exists('items', id)).toBe(false)
      expect(await exists('items', `${id}-after`)).toBe(false)
      if (how !== 'session destroyed') expect(await exists('items', `${id}-other`)).toBe(true)
      session.destroy()
    })
  }

  it('cancelOnAbort: a stream reset during pg_sleep cancels the statement (57014), one release', async () => {
    const slept = gate<string>()
    const { base } = await app(
      (a) => {
        a.get('/sleep/:id', async (request) => {
          await insert((request.params as { id: string }).id)
          slept.open(await outcome(h.db.query('SELECT pg_sleep(30)')))
          return { ok: true }
        })
      },
      { http2: true },
      { cancelOnAbort: true },
    )
    const session = h2connect(base)
    const call = h2request(session, '/sleep/h2-sleep')
    call.stream.on('error', () => {})
    await sleeping()
    call.stream.close(http2.constants.NGHTTP2_CANCEL)
    expect(await slept.promise).toBe('57014')
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await exists('items', 'h2-sleep')).toBe(false)
    session.destroy()
  })

  // BUG: on HTTP/2 a stream payload whose COMMIT fails at its end reaches a node:http2 client as a clean end (200, whole body, rstCode 0); it should end with RST_STREAM carrying an error code (INTERNAL_ERROR), as HTTP/1 cuts the socket.
  // (Fastify answers the body's error with res.destroy() without an error, which Node turns into RST_STREAM(NO_ERROR); node's client reads that as the end of the body.)
  it('a stream payload whose COMMIT fails at its end: the h2 stream is reset with an error code, not ended cleanly', async () => {
    const { base } = await app(
      (a) => {
        a.get('/report/:id', async (request, reply) => {
          const { id } = request.params as { id: string }
          await insert(id)
          async function* lines() {
            yield 'line 1\n'
            await insertOrphan(`${id}-orphan`)
            yield 'line 2\n'
          }
          reply.type('text/plain')
          return reply.send(Readable.from(lines()))
        })
      },
      { http2: true },
    )
    const session = h2connect(base)
    const r = await h2request(session, '/report/h2-rep').done
    expect(r.status).toBe(200)
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await exists('items', 'h2-rep')).toBe(false)
    expect(r.ended).toBe('error')
    session.destroy()
  })
})

// ── keep-alive and pipelining with Fastify's timeouts ─────────────────────

/** Raw HTTP/1.1 on one socket: what arrived, and whether the socket was closed. */
function pipeline(port: number, requests: string) {
  const socket = net.connect(port, '127.0.0.1')
  socket.on('error', () => {})
  let text = ''
  let closed = false
  socket.setEncoding('latin1')
  socket.on('data', (c: string) => {
    text += c
  })
  socket.on('close', () => {
    closed = true
  })
  socket.write(requests)
  return {
    socket,
    text: () => text,
    closed: () => closed,
  }
}

const get = (path: string) => `GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`

describe('keep-alive and pipelined requests', () => {
  it('two pipelined requests, the first slow: the second runs meanwhile, each commits its own unit before its response', async () => {
    const firstGo = gate()
    const secondDone = gate()
    const { port } = await app((a) => {
      a.get('/p/:id', async (request) => {
        const { id } = request.params as { id: string }
        await insert(id)
        if (id === 'pl-1') await firstGo.promise
        else secondDone.open()
        return { id }
      })
    })
    const c = pipeline(port, get('/p/pl-1') + get('/p/pl-2'))
    await secondDone.promise
    // The second's response waits behind the first one's: nothing is sent, and nothing of
    // either is visible yet.
    await new Promise((r) => setTimeout(r, 50))
    expect(c.text()).toBe('')
    firstGo.open()
    await waitFor('both responses', () => (c.text().match(/HTTP\/1\.1 200/g) ?? []).length === 2)
    c.socket.destroy()
    await expectSettled(h)
    expect(h.releases() - released).toBe(2)
    expect(await exists('items', 'pl-1')).toBe(true)
    expect(await exists('items', 'pl-2')).toBe(true)
  })

  // BUG: when connectionTimeout destroys a socket with two pipelined requests in flight, only the first is aborted; the second handler's statements run on (rolled back only at its end) — it should be aborted too (next statement fails with ScopeAbortedError).
  // (request-scope.ts watches aborts only through reply.raw 'close', which Node never emits on a queued pipelined response; the s4 fix checks the socket only in send().)
  it('connectionTimeout while the first of two pipelined requests is slow: both roll back, the second’s next statement fails, one release each', async () => {
    const secondStarted = gate()
    const firstNext = gate<string>()
    const secondNext = gate<string>()
    const go = gate()
    const { port } = await app(
      (a) => {
        a.get('/t/:id', async (request) => {
          const { id } = request.params as { id: string }
          await insert(id)
          if (id === 't-2') secondStarted.open()
          await go.promise
          const next = await outcome(insert(`${id}-after`))
          ;(id === 't-1' ? firstNext : secondNext).open(next)
          return { id }
        })
      },
      { connectionTimeout: 200 },
    )
    const c = pipeline(port, get('/t/t-1') + get('/t/t-2'))
    await secondStarted.promise
    await waitFor('the connection to time out', () => c.closed())
    await new Promise((r) => setTimeout(r, 50))
    go.open()
    const next = { first: await firstNext.promise, second: await secondNext.promise }
    await expectSettled(h)
    expect(h.releases() - released).toBe(2)
    for (const id of ['t-1', 't-1-after', 't-2', 't-2-after']) {
      expect(await exists('items', id)).toBe(false)
    }
    // The second request's client is gone just the same: its work must not go on as if not.
    expect(next).toEqual({ first: 'ScopeAbortedError', second: 'ScopeAbortedError' })
  })

  // BUG: a pipelined request whose client leaves is not aborted, so cancelOnAbort does not cancel its running pg_sleep (it runs to its end, holding the connection); it should be cancelled (57014) like the first request's.
  // (same cause: no 'close' on the queued ServerResponse; request.raw 'close' is not watched in request-scope.ts.)
  it('cancelOnAbort: the client of two pipelined requests leaves; the second request’s pg_sleep is cancelled too', async () => {
    const slept = { first: gate<string>(), second: gate<string>() }
    const started = { first: gate(), second: gate() }
    const { port } = await app(
      (a) => {
        a.get('/s/:id', async (request) => {
          const { id } = request.params as { id: string }
          await insert(id)
          const which = id === 'pc-1' ? 'first' : 'second'
          started[which].open()
          slept[which].open(await outcome(h.db.query('SELECT pg_sleep(5)')))
          return { id }
        })
      },
      {},
      { cancelOnAbort: true },
    )
    const c = pipeline(port, get('/s/pc-1') + get('/s/pc-2'))
    await Promise.all([started.first.promise, started.second.promise])
    await waitFor('both statements sleeping', async () => {
      const { rows } = await h.independent.query(
        "SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = $1 AND state = 'active' AND query LIKE '%pg_sleep%'",
        [h.app],
      )
      return rows[0].n === 2
    })
    c.socket.destroy()
    try {
      expect(await slept.first.promise).toBe('57014')
      const second = await Promise.race([
        slept.second.promise,
        new Promise<string>((r) =>
          setTimeout(() => r('still sleeping 2.5 s after the client left'), 2500),
        ),
      ])
      expect(second).toBe('57014')
    } finally {
      // Either way, leave nothing running for the next test.
      await slept.second.promise
      await expectSettled(h)
    }
    expect(await exists('items', 'pc-1')).toBe(false)
    expect(await exists('items', 'pc-2')).toBe(false)
  })

  it('requestTimeout on the second request of a keep-alive socket (a stalled upload): 408, its work rolls back; the first committed', async () => {
    const hooked = gate()
    const { port } = await app(
      (a) => {
        a.post('/up/:id', {
          onRequest: async (request) => {
            const { id } = request.params as { id: string }
            await insert(id)
            if (id === 'up-2') hooked.open()
          },
          handler: async (request) => {
            await insert(`${(request.params as { id: string }).id}-handler`)
            return { ok: true }
          },
        })
      },
      {
        requestTimeout: 300,
        http: { connectionsCheckingInterval: 50, headersTimeout: 200 },
      } as FastifyServerOptions,
    )
    const post = (id: string, body: string, length: number) =>
      `POST /up/${id} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: ${length}\r\n\r\n${body}`
    const c = pipeline(port, post('up-1', 'abc', 3))
    await waitFor('the first response', () => c.text().includes('HTTP/1.1 200'))
    c.socket.write(post('up-2', 'only a part', 1000))
    await hooked.promise
    await waitFor('the 408', () => c.text().includes('HTTP/1.1 408') || c.closed())
    expect(c.text()).toContain('HTTP/1.1 408')
    c.socket.destroy()
    await expectSettled(h)
    expect(h.releases() - released).toBe(2)
    expect(await exists('items', 'up-1')).toBe(true)
    expect(await exists('items', 'up-1-handler')).toBe(true)
    expect(await exists('items', 'up-2')).toBe(false)
    expect(await exists('items', 'up-2-handler')).toBe(false)
  })
})

// ── payloads and statuses with a failed COMMIT ────────────────────────────

describe('a failed COMMIT, by payload and status', () => {
  it('reply.send(Buffer) larger than 64 KiB: a 500, nothing stored, one release', async () => {
    const { port } = await app((a) => {
      a.get('/big/:id', async (request, reply) => {
        await insertOrphan((request.params as { id: string }).id)
        reply.type('application/octet-stream')
        return reply.send(Buffer.alloc(100 * 1024, 7))
      })
    })
    const r = await raw(port, '/big/big-1')
    expect(r.status).toBe(500)
    expect(r.ended).toBe('complete')
    expect(r.headers['content-type']).toMatch(/json/)
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await exists('children', 'big-1')).toBe(false)
  })

  for (const status of [204, 304] as const) {
    it(`reply.code(${status}).send(): a 500, nothing stored, one release`, async () => {
      const { port } = await app((a) => {
        a.put('/empty/:id', async (request, reply) => {
          await insertOrphan((request.params as { id: string }).id)
          reply.header('etag', '"v2"')
          return reply.code(status).send()
        })
      })
      const r = await raw(port, `/empty/e-${status}`, { method: 'PUT' })
      expect(r.status).toBe(500)
      expect(r.headers.etag).toBeUndefined()
      await expectSettled(h)
      expect(h.releases() - released).toBe(1)
      expect(await exists('children', `e-${status}`)).toBe(false)
    })
  }

  it('reply.redirect(): a 500 without the Location of work that was not saved', async () => {
    const { port } = await app((a) => {
      a.post('/orders/:id', async (request, reply) => {
        const { id } = request.params as { id: string }
        await insertOrphan(id)
        return reply.redirect(`/orders/${id}/done`, 303)
      })
    })
    const r = await raw(port, '/orders/rd-1', { method: 'POST' })
    expect(r.status).toBe(500)
    expect(r.headers.location).toBeUndefined()
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await exists('children', 'rd-1')).toBe(false)
  })

  it('reply.redirect() that commits: the row is visible the moment the client has the 303', async () => {
    const { port } = await app((a) => {
      a.post('/orders/:id', async (request, reply) => {
        const { id } = request.params as { id: string }
        await insert(id)
        return reply.redirect(`/orders/${id}/done`, 303)
      })
    })
    const seen = await new Promise<{ status?: number; location?: string; visible: boolean }>(
      (resolve) => {
        const req = http.request(
          { host: '127.0.0.1', port, path: '/orders/rd-ok', method: 'POST', agent: false },
          (res) => {
            void exists('items', 'rd-ok').then((visible) => {
              res.resume()
              resolve({ status: res.statusCode, location: res.headers.location, visible })
            })
          },
        )
        req.end()
      },
    )
    expect(seen).toEqual({ status: 303, location: '/orders/rd-ok/done', visible: true })
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
  })

  it('a stream payload the handler encoded itself (content-encoding: gzip set by hand), COMMIT fails: never a clean 200', async () => {
    const zlib = await import('node:zlib')
    const gz = zlib.gzipSync(Buffer.from('x'.repeat(10_000)))
    const { port } = await app((a) => {
      a.get('/gz/:id', async (request, reply) => {
        const { id } = request.params as { id: string }
        await insertOrphan(id)
        reply.header('content-encoding', 'gzip')
        reply.type('text/plain')
        return reply.send(Readable.from([gz.subarray(0, 10), gz.subarray(10)]))
      })
    })
    const r = await raw(port, '/gz/gzs-1', { headers: { 'accept-encoding': 'gzip' } })
    expect({ status: r.status, ended: r.ended }).not.toEqual({ status: 200, ended: 'complete' })
    if (r.status === 500) expect(r.headers['content-encoding']).toBeUndefined()
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await exists('children', 'gzs-1')).toBe(false)
  })
})

// ── what the handler does with its session ────────────────────────────────

describe('the handler and its session', () => {
  it('getSession().commit() then throw: the committed part stays, the rest rolls back, a 500, one release', async () => {
    const { port } = await app((a) => {
      a.post('/ct/:id', async (request) => {
        const { id } = request.params as { id: string }
        await insert(id)
        await request.session.commit()
        await insert(`${id}-after`)
        throw new Error('failed after an explicit commit')
      })
    })
    const r = await raw(port, '/ct/ct-1', { method: 'POST' })
    expect(r.status).toBe(500)
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await exists('items', 'ct-1')).toBe(true)
    expect(await exists('items', 'ct-1-after')).toBe(false)
  })

  it('fire-and-forget work started after the response: fails with SessionClosedError, checks nothing out', async () => {
    const late = gate<unknown>()
    const { port } = await app((a) => {
      a.post('/ff/:id', async (request) => {
        const { id } = request.params as { id: string }
        await insert(id)
        const session = request.session
        setTimeout(() => {
          session
            .use((c) => (c as { query(s: string): Promise<unknown> }).query('SELECT 1'))
            .then(late.open, late.open)
        }, 100)
        return { ok: true }
      })
    })
    const r = await raw(port, '/ff/ff-1', { method: 'POST' })
    expect(r.status).toBe(200)
    const error = await late.promise
    expect(error).toBeInstanceOf(SessionClosedError)
    expect((error as Error).message).toContain('POST /ff/:id')
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await exists('items', 'ff-1')).toBe(true)
  })

  it('a statement the handler started and did not await: the COMMIT waits for it, the row is there when the client has the response', async () => {
    const { port } = await app((a) => {
      a.post('/na/:id', async (request) => {
        const { id } = request.params as { id: string }
        void h.db
          .query("SELECT pg_sleep(0.2); INSERT INTO items (id) VALUES ('na-1')")
          .catch(() => {})
        void id
        return { ok: true }
      })
    })
    const seen = await new Promise<{ status?: number; visible: boolean }>((resolve) => {
      const req = http.request(
        { host: '127.0.0.1', port, path: '/na/na-1', method: 'POST', agent: false },
        (res) => {
          void exists('items', 'na-1').then((visible) => {
            res.resume()
            resolve({ status: res.statusCode, visible })
          })
        },
      )
      req.end()
    })
    expect(seen).toEqual({ status: 200, visible: true })
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
  })

  // BUG: a second app.register(scopedSession, { scope: other, decorate: false }) (two databases) throws FST_ERR_DEC_ALREADY_PRESENT ('Symbol(scoped.request)') out of the plugin function: an uncaught exception, and the boot hangs until pluginTimeout; it should either give each scope its own session or reject registration at once with an error naming scopedSession.
  // (plugin.ts: fastify.decorateRequest(kScope, null) runs outside the try that passes option errors to done(), and kScope is one slot per app.)
  it('two scopedSession registrations (two scopes, the second with decorate: false): each scope commits its own work, or registration fails at once saying why', async () => {
    const other = await harness('fastify_review_s5_b', { max: 2 })
    await other.independent.query('CREATE TABLE items (id text PRIMARY KEY)')
    const uncaught: unknown[] = []
    const saved = process.listeners('uncaughtException')
    process.removeAllListeners('uncaughtException')
    const catcher = (e: unknown) => uncaught.push(e)
    process.on('uncaughtException', catcher)
    try {
      const a = Fastify({ pluginTimeout: 2_000 })
      apps.push(a)
      let bootError: unknown
      try {
        await a.register(scopedSession, { scope: h.scope })
        await a.register(scopedSession, { scope: other.scope, decorate: false })
        a.post('/two/:id', async (request) => {
          const { id } = request.params as { id: string }
          await insert(id)
          await other.db.query('INSERT INTO items (id) VALUES ($1)', [id])
          return { ok: true }
        })
        await a.ready()
      } catch (e) {
        bootError = e
      }
      expect(uncaught).toEqual([])
      if (bootError !== undefined) {
        // A refusal says what is wrong, at once: not the plugin timeout.
        expect((bootError as { code?: string }).code).not.toBe('FST_ERR_PLUGIN_TIMEOUT')
        expect((bootError as Error).message).toMatch(/scopedSession/)
        return
      }
      const { port } = await listen(a)
      const r = await raw(port, '/two/two-1', { method: 'POST' })
      expect(r.status).toBe(200)
      await expectSettled(h)
      await expectSettled(other)
      expect(await exists('items', 'two-1')).toBe(true)
      expect((await committed(other, 'SELECT id FROM items')).map((x) => x.id)).toEqual(['two-1'])
    } finally {
      process.off('uncaughtException', catcher)
      for (const l of saved) process.on('uncaughtException', l)
      await other.close()
    }
  })
})
