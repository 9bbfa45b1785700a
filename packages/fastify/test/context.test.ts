/**
 * The whole chain runs inside the request's scope: the handler, a helper it
 * calls, a timer it starts, a content-type parser (fed by req events, where
 * AsyncLocalStorage is lost) and a preHandler hook all see the same session;
 * two requests at once never see each other's; a route that never touches
 * the database checks out nothing. A callback-style hook that calls `done`
 * from another request's context does not hand that request's session over.
 */
import Fastify, { type FastifyInstance, type FastifyRequest } from 'fastify'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { scopedSession } from '../src/index.ts'
import { expectSettled, type Harness, harness, listen, send, waitFor } from './support.ts'

let h: Harness
let app: FastifyInstance
let base: string
let port: number
let parkedRequests: () => number

async function backendPid(): Promise<number> {
  const { rows } = await h.db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
  return rows[0]!.pid
}

beforeAll(async () => {
  h = await harness('fastify_context')
  app = Fastify()
  await app.register(scopedSession, { scope: h.scope })

  // A parser with parseAs: Fastify calls it from the request's 'end' listener.
  app.addContentTypeParser(
    'text/x-order',
    { parseAs: 'string' },
    async (request: FastifyRequest) => {
      const pid = await backendPid()
      return {
        parserPid: pid,
        parserSession: h.scope.getSession().id,
        requestSession: request.session.id,
      }
    },
  )

  app.post('/everywhere', {
    preHandler: async (request) => {
      ;(request as any).hookPid = await backendPid()
      ;(request as any).hookSession = h.scope.getSession().id
    },
    handler: async (request) => {
      const body = request.body as Record<string, unknown>
      const helper = async () => ({ pid: await backendPid(), session: h.scope.getSession().id })
      const fromHelper = await helper()
      const fromTimer = await new Promise<{ pid: number; session: string }>((resolve, reject) => {
        setTimeout(() => {
          backendPid().then((pid) => resolve({ pid, session: h.scope.getSession().id }), reject)
        }, 5)
      })
      return {
        handler: { pid: await backendPid(), session: h.scope.getSession().id },
        helper: fromHelper,
        timer: fromTimer,
        hook: { pid: (request as any).hookPid, session: (request as any).hookSession },
        parser: {
          pid: body.parserPid,
          session: body.parserSession,
          viaRequest: body.requestSession,
        },
        name: h.scope.getSession().name,
      }
    },
  })

  app.get('/whoami/:n', async (request) => {
    const n = (request.params as { n: string }).n
    const mine = h.scope.getSession().id
    await h.db.query('SELECT pg_sleep(0.01)')
    const pid = await backendPid()
    // Still ours after the other request ran in between.
    return { n, mine, after: h.scope.getSession().id, pid }
  })

  app.get('/no-db', async () => ({ ok: true, hasSession: h.scope.hasSession() }))

  // A callback-style hook that parks the first request's `done` and calls it from the second
  // request's hook: the first request resumes inside the second one's scope.
  await app.register(async (child) => {
    const parked = new Map<string, () => void>()
    const pairUp = (request: FastifyRequest, _reply: unknown, done: () => void) => {
      const pair = (request.query as { pair: string }).pair
      const first = parked.get(pair)
      if (!first) {
        parked.set(pair, done)
        return
      }
      parked.delete(pair)
      first()
      done()
    }
    const who = (request: FastifyRequest) => ({
      viaAls: h.scope.getSession().id,
      viaRequest: request.session.id,
      hook: (request as any).hookSession,
    })
    const recordHook = async (request: FastifyRequest) => {
      ;(request as any).hookSession = h.scope.getSession().id
    }
    child.register(async (parkOnRequest) => {
      parkOnRequest.addHook('onRequest', pairUp)
      parkOnRequest.get('/paired', async (request) => who(request))
      parkOnRequest.post('/paired', { preHandler: recordHook }, async (request) => who(request))
    })
    child.get('/paired-pre-handler', { preHandler: pairUp }, async (request) => who(request))
    parkedRequests = () => parked.size
  })

  ;({ base, port } = await listen(app))
})

afterAll(async () => {
  await app.close()
  await h.close()
})

describe('getSession() across the chain', () => {
  it('is the same session on the same connection in parser, preHandler, handler, helper and timer', async () => {
    // Big enough that the body arrives in several chunks, after the parser started listening.
    const body = 'x'.repeat(256 * 1024)
    const res = await send(port, {
      method: 'POST',
      path: '/everywhere',
      headers: { 'content-type': 'text/x-order', 'content-length': Buffer.byteLength(body) },
      body,
    }).response
    expect(res.status).toBe(200)
    const r = JSON.parse(res.body)
    const sessions = [
      r.handler.session,
      r.helper.session,
      r.timer.session,
      r.hook.session,
      r.parser.session,
    ]
    const pids = [r.handler.pid, r.helper.pid, r.timer.pid, r.hook.pid, r.parser.pid]
    expect(new Set(sessions).size).toBe(1)
    expect(r.parser.viaRequest).toBe(r.handler.session)
    expect(new Set(pids).size).toBe(1)
    expect(r.name).toBe('POST /everywhere')
    await expectSettled(h)
  })

  it('two concurrent requests never see each other’s session or connection', async () => {
    const acquired = h.scope.stats().totals.acquired
    const results = await Promise.all(
      Array.from({ length: 20 }, (_, i) =>
        fetch(`${base}/whoami/${i}`).then((r) => r.json() as Promise<Record<string, unknown>>),
      ),
    )
    for (const [i, r] of results.entries()) {
      expect(r.n).toBe(String(i))
      expect(r.after).toBe(r.mine)
    }
    expect(new Set(results.map((r) => r.mine)).size).toBe(20)
    // Each request checked out exactly one connection, and kept it for all its statements.
    expect(h.scope.stats().totals.acquired - acquired).toBe(20)
    await expectSettled(h)
  })

  it('a route that never touches the database checks out no connection', async () => {
    const acquired = h.scope.stats().totals.acquired
    const released = h.releases()
    const before = h.pool.totalCount
    for (let i = 0; i < 20; i++) {
      const r = await fetch(`${base}/no-db`).then((res) => res.json())
      expect(r).toEqual({ ok: true, hasSession: true })
    }
    expect(h.scope.stats().totals.acquired).toBe(acquired)
    expect(h.releases()).toBe(released)
    expect(h.pool.totalCount).toBe(before)
    await expectSettled(h)
  })
})

describe('a hook that calls back from another request’s context', () => {
  async function pair(method: 'GET' | 'POST', path: string, id: string) {
    const url = `${base}${path}?pair=${id}`
    const init =
      method === 'POST'
        ? { method, headers: { 'content-type': 'application/json' }, body: '{"a":1}' }
        : {}
    const first = fetch(url, init).then((r) => r.json() as Promise<Record<string, string>>)
    await waitFor('the first request to park', () => parkedRequests() === 1)
    const second = fetch(url, init).then((r) => r.json() as Promise<Record<string, string>>)
    return Promise.all([first, second])
  }

  it('an onRequest hook: the handler of a GET route still gets its own session', async () => {
    const [a, b] = await pair('GET', '/paired', 'get')
    expect(a.viaAls).toBe(a.viaRequest)
    expect(b.viaAls).toBe(b.viaRequest)
    expect(a.viaRequest).not.toBe(b.viaRequest)
    await expectSettled(h)
  })

  it('an onRequest hook: a POST route’s preHandler hook and its handler still get their own session', async () => {
    const [a, b] = await pair('POST', '/paired', 'post')
    expect(a.viaAls).toBe(a.viaRequest)
    expect(a.hook).toBe(a.viaRequest)
    expect(b.viaAls).toBe(b.viaRequest)
    expect(b.hook).toBe(b.viaRequest)
    expect(a.viaRequest).not.toBe(b.viaRequest)
    await expectSettled(h)
  })

  it('a preHandler hook: the handler still gets its own session', async () => {
    const [a, b] = await pair('GET', '/paired-pre-handler', 'pre-handler')
    expect(a.viaAls).toBe(a.viaRequest)
    expect(b.viaAls).toBe(b.viaRequest)
    expect(a.viaRequest).not.toBe(b.viaRequest)
    await expectSettled(h)
  })
})
