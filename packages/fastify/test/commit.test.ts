/**
 * Commit or roll back, before the client sees the response, exactly once:
 * a committed row is visible from another connection the moment the client
 * has the response; a COMMIT that fails turns into a 500; thrown errors (Error
 * or not), 5xx and errors in hooks roll back, a returned 4xx commits; every
 * request that touched the database releases its connection exactly once.
 */
import Fastify, { type FastifyInstance } from 'fastify'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { scopedSession } from '../src/index.ts'
import { committed, expectSettled, gate, type Harness, harness, listen } from './support.ts'

let h: Harness
let app: FastifyInstance
let base: string
/** Holds /send-then-work after it answered; `reached` opens once it waits. */
let hold = gate()
let reached = gate()

async function insert(tag: string): Promise<void> {
  await h.db.query('INSERT INTO events (tag) VALUES ($1)', [tag])
}

async function rowsOf(tag: string): Promise<number> {
  const rows = await committed(h, 'SELECT count(*)::int AS n FROM events WHERE tag = $1', [tag])
  return rows[0].n
}

beforeAll(async () => {
  h = await harness('fastify_commit')
  await h.independent.query('CREATE TABLE events (id serial PRIMARY KEY, tag text NOT NULL)')
  await h.independent.query('CREATE TABLE parents (id int PRIMARY KEY)')
  await h.independent.query(
    'CREATE TABLE children (id serial PRIMARY KEY, parent int REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)',
  )
  app = Fastify()
  await app.register(scopedSession, { scope: h.scope })

  app.post('/orders/:n', async (request) => {
    const { n } = request.params as { n: string }
    await insert(`order-${n}`)
    return { n }
  })

  // The foreign key is only checked at COMMIT: the handler succeeds, the commit fails.
  app.post('/orphan', async () => {
    await h.db.query('INSERT INTO children (parent) VALUES (42) RETURNING id')
    await insert('orphan')
    return { ok: true }
  })

  app.get('/ok', async () => {
    await insert('ok')
    return { ok: true }
  })
  app.get('/throw-error', async () => {
    await insert('throw-error')
    throw new Error('boom')
  })
  app.get('/throw-string', async () => {
    await insert('throw-string')
    throw 'a string, not an Error'
  })
  app.get('/throw-undefined', async () => {
    await insert('throw-undefined')
    throw undefined
  })
  app.get('/sync-throw', () => {
    // A callback-style handler that throws after starting a statement.
    void insert('sync-throw')
    throw new Error('sync boom')
  })
  app.get('/return-500', async (_request, reply) => {
    await insert('return-500')
    return reply.code(500).send({ failed: true })
  })
  app.get('/return-503', async (_request, reply) => {
    await insert('return-503')
    reply.code(503)
    return { unavailable: true }
  })
  app.get('/return-404', async (_request, reply) => {
    await insert('return-404')
    return reply.code(404).send({ found: false })
  })
  app.get('/throw-404', async () => {
    await insert('throw-404')
    throw Object.assign(new Error('no such order'), { statusCode: 404 })
  })
  app.get('/reply-send', async (_request, reply) => {
    await insert('reply-send')
    return reply.code(201).send({ created: true })
  })
  app.get('/sync-send', (_request, reply) => {
    insert('sync-send').then(
      () => reply.send({ ok: true }),
      (e) => reply.send(e),
    )
  })
  app.get('/hook-error', {
    preHandler: async () => {
      await insert('hook-error')
      throw new Error('not allowed')
    },
    handler: async () => {
      await insert('hook-error-handler')
      return { unreachable: true }
    },
  })
  app.get('/hook-reply', {
    preHandler: async (_request, reply) => {
      await insert('hook-reply')
      return reply.code(401).send({ login: 'first' })
    },
    handler: async () => {
      await insert('hook-reply-handler')
      return { unreachable: true }
    },
  })
  // A hook that sends without `return reply`: Fastify runs the handler too, concurrently.
  app.get('/hook-send-no-return', {
    preHandler: async (_request, reply) => {
      await insert('hook-send-no-return')
      reply.send({ early: true })
    },
    handler: async () => {
      await insert('hook-send-no-return-handler')
      return { late: true }
    },
  })
  app.get('/error-handler', {
    errorHandler: async (error, request, reply) => {
      // The error handler runs inside the request's scope, on the same session.
      await insert('error-handler-log')
      return reply
        .code(200)
        .send({ handled: (error as Error).message, session: request.session.id })
    },
    handler: async () => {
      await insert('error-handler')
      throw new Error('handled later')
    },
  })
  app.get('/onsend-error', {
    onSend: async () => {
      throw new Error('onSend failed')
    },
    handler: async () => {
      await insert('onsend-error')
      return { ok: true }
    },
  })
  // Answers a 500 (a rollback) from inside the handler, then keeps working.
  app.get('/send-then-work', async (_request, reply) => {
    await insert('send-then-work')
    reply.code(500).send({ failed: true })
    reached.open()
    await hold.promise
    await insert('send-then-work-late').catch(() => {})
  })
  ;({ base } = await listen(app))
})

afterAll(async () => {
  await app?.close()
  await h.close()
})

describe('commit before the response', () => {
  it('a row inserted by a 200 handler is visible the moment the client has the response (200 times)', async () => {
    const released = h.releases()
    let missing = 0
    for (let i = 0; i < 200; i++) {
      const res = await fetch(`${base}/orders/${i}`, { method: 'POST' })
      expect(res.status).toBe(200)
      await res.arrayBuffer()
      // No waiting, no retry: the COMMIT happened before the response was written.
      if ((await rowsOf(`order-${i}`)) !== 1) missing++
    }
    expect(missing).toBe(0)
    await expectSettled(h)
    expect(h.releases() - released).toBe(200)
  })

  it('a COMMIT that fails (deferred foreign key) becomes a 500, and nothing is saved', async () => {
    const released = h.releases()
    const res = await fetch(`${base}/orphan`, { method: 'POST' })
    expect(res.status).toBe(500)
    const body = (await res.json()) as { message: string }
    expect(body.message).toMatch(/was not committed/)
    expect(body.message).toMatch(/foreign key/)
    expect(await rowsOf('orphan')).toBe(0)
    expect(await committed(h, 'SELECT * FROM children')).toEqual([])
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
  })
})

describe('how each outcome ends: exactly one release, the right commit or rollback', () => {
  const cases: { path: string; status: number; kept: Record<string, number> }[] = [
    { path: '/ok', status: 200, kept: { ok: 1 } },
    { path: '/throw-error', status: 500, kept: { 'throw-error': 0 } },
    { path: '/throw-string', status: 500, kept: { 'throw-string': 0 } },
    { path: '/throw-undefined', status: 500, kept: { 'throw-undefined': 0 } },
    { path: '/sync-throw', status: 500, kept: { 'sync-throw': 0 } },
    { path: '/return-500', status: 500, kept: { 'return-500': 0 } },
    { path: '/return-503', status: 503, kept: { 'return-503': 0 } },
    { path: '/return-404', status: 404, kept: { 'return-404': 1 } },
    { path: '/throw-404', status: 404, kept: { 'throw-404': 0 } },
    { path: '/reply-send', status: 201, kept: { 'reply-send': 1 } },
    { path: '/sync-send', status: 200, kept: { 'sync-send': 1 } },
    { path: '/hook-error', status: 500, kept: { 'hook-error': 0, 'hook-error-handler': 0 } },
    { path: '/hook-reply', status: 401, kept: { 'hook-reply': 1, 'hook-reply-handler': 0 } },
    {
      path: '/hook-send-no-return',
      status: 200,
      kept: { 'hook-send-no-return': 1, 'hook-send-no-return-handler': 0 },
    },
    { path: '/error-handler', status: 200, kept: { 'error-handler': 0, 'error-handler-log': 0 } },
    { path: '/onsend-error', status: 500, kept: { 'onsend-error': 1 } },
  ]
  for (const c of cases) {
    it(`${c.path} → ${c.status}, ${Object.entries(c.kept)
      .map(([tag, n]) => `${tag} ${n ? 'committed' : 'rolled back'}`)
      .join(', ')}`, async () => {
      const released = h.releases()
      const res = await fetch(base + c.path)
      await res.arrayBuffer()
      expect(res.status).toBe(c.status)
      for (const [tag, n] of Object.entries(c.kept))
        expect({ tag, n: await rowsOf(tag) }).toEqual({ tag, n })
      await expectSettled(h)
      expect(h.releases() - released).toBe(1)
    })
  }
})

describe('a rollback answered while the handler still runs', () => {
  it('goes out at once; the connection is kept until the handler settles, then rolled back and released once', async () => {
    hold = gate()
    reached = gate()
    const released = h.releases()
    const res = await fetch(`${base}/send-then-work`)
    expect(res.status).toBe(500)
    await res.arrayBuffer()
    await reached.promise
    // The handler still runs: its connection is not given back under it.
    expect(h.scope.stats().holding).toBe(1)
    expect(h.releases()).toBe(released)
    hold.open()
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await rowsOf('send-then-work')).toBe(0)
    expect(await rowsOf('send-then-work-late')).toBe(0)
  })
})
