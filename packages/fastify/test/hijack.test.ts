/**
 * `reply.hijack()` skips onSend, so the plugin cannot commit before the
 * response; the raw response's 'close' is the backstop: the unit of work
 * ends there (once the handler settled), commits if the response completed
 * and commitOn agrees, and the connection is released exactly once.
 */
import Fastify, { type FastifyInstance } from 'fastify'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { scopedSession } from '../src/index.ts'
import {
  committed,
  expectSettled,
  gate,
  type Harness,
  harness,
  listen,
  send,
  waitFor,
} from './support.ts'

let h: Harness
let app: FastifyInstance
let base: string
let port: number
let hijacked = gate()

async function insert(tag: string): Promise<void> {
  await h.db.query('INSERT INTO events (tag) VALUES ($1)', [tag])
}

async function rowsOf(tag: string): Promise<number> {
  const rows = await committed(h, 'SELECT count(*)::int AS n FROM events WHERE tag = $1', [tag])
  return rows[0].n
}

beforeAll(async () => {
  h = await harness('fastify_hijack')
  await h.independent.query('CREATE TABLE events (id serial PRIMARY KEY, tag text NOT NULL)')
  app = Fastify()
  await app.register(scopedSession, { scope: h.scope })

  app.get('/raw/:status', async (request, reply) => {
    const status = Number((request.params as { status: string }).status)
    await insert(`raw-${status}`)
    reply.hijack()
    reply.raw.writeHead(status, { 'content-type': 'text/plain' })
    reply.raw.end('written by hand')
  })

  app.get('/raw-later', async (_request, reply) => {
    await insert('raw-later')
    reply.hijack()
    hijacked.open()
    // The response is never written: only the client going away ends this request.
  })

  app.get('/hook-hijack', {
    preHandler: async (_request, reply) => {
      await insert('hook-hijack')
      reply.hijack()
      reply.raw.end('hijacked in a hook')
    },
    handler: async () => {
      await insert('hook-hijack-handler')
      return { unreachable: true }
    },
  })
  ;({ base, port } = await listen(app))
})

afterAll(async () => {
  await app?.close()
  await h.close()
})

describe('reply.hijack()', () => {
  it('a hijacked 200 written by hand commits at close, one release', async () => {
    const released = h.releases()
    const res = await fetch(`${base}/raw/200`)
    expect(await res.text()).toBe('written by hand')
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await rowsOf('raw-200')).toBe(1)
  })

  it('a hijacked 500 written by hand rolls back, one release', async () => {
    const released = h.releases()
    const res = await fetch(`${base}/raw/500`)
    expect(res.status).toBe(500)
    await res.text()
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await rowsOf('raw-500')).toBe(0)
  })

  it('a hijacked reply that is never written ends when the client goes away: rollback, one release', async () => {
    hijacked = gate()
    const released = h.releases()
    const client = send(port, { path: '/raw-later' })
    client.response.catch(() => {})
    await hijacked.promise
    // The handler has settled, the reply is hijacked and unwritten: the session waits for 'close'.
    await new Promise((r) => setTimeout(r, 50))
    expect(h.scope.holders().map((x) => x.name)).toEqual(['GET /raw-later'])
    client.abort()
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await rowsOf('raw-later')).toBe(0)
  })

  it('a reply hijacked in a hook (the handler never runs) still ends exactly once', async () => {
    const released = h.releases()
    const res = await fetch(`${base}/hook-hijack`)
    expect(await res.text()).toBe('hijacked in a hook')
    await waitFor('the release', () => h.releases() - released === 1)
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await rowsOf('hook-hijack')).toBe(1)
    expect(await rowsOf('hook-hijack-handler')).toBe(0)
  })
})
