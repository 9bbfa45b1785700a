/**
 * A stream payload is produced after the handler returned: it keeps the
 * request's session (getSession() works in the generator, even when the next
 * chunk is pulled by a socket 'drain'), its rows stay uncommitted while it
 * streams, and the response only ends cleanly after the COMMIT. A failed
 * commit cuts the response off (or, if nothing was sent yet, becomes a 500);
 * a client that goes away mid-stream rolls it back. One release each time.
 */
import { EventEmitter } from 'node:events'
import http from 'node:http'
import { Readable } from 'node:stream'
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
let port: number
let base: string
let proceed = gate()
let sessionsSeen: string[] = []
let generatorFinished = gate<string>()
/** Fires from the test's own context: listeners run outside every request's scope. */
const bus = new EventEmitter()

async function insert(tag: string): Promise<void> {
  await h.db.query('INSERT INTO events (tag) VALUES ($1)', [tag])
}

async function rowsOf(tag: string): Promise<number> {
  const rows = await committed(h, 'SELECT count(*)::int AS n FROM events WHERE tag = $1', [tag])
  return rows[0].n
}

const chunk = 'x'.repeat(64 * 1024)

beforeAll(async () => {
  h = await harness('fastify_stream')
  await h.independent.query('CREATE TABLE events (id serial PRIMARY KEY, tag text NOT NULL)')
  await h.independent.query('CREATE TABLE parents (id int PRIMARY KEY)')
  await h.independent.query(
    'CREATE TABLE children (id serial PRIMARY KEY, parent int REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)',
  )
  app = Fastify()
  await app.register(scopedSession, { scope: h.scope })

  // 64 chunks of 64 KiB with a statement every 8: the socket fills, and later
  // chunks are pulled by 'drain' events, outside AsyncLocalStorage.
  app.get('/report', async () => {
    await insert('report-start')
    async function* lines() {
      yield 'first\n'
      await proceed.promise
      for (let i = 0; i < 64; i++) {
        sessionsSeen.push(h.scope.getSession().id)
        if (i % 8 === 0) await insert('report-line')
        yield chunk
      }
    }
    return Readable.from(lines())
  })

  app.get('/orphan-stream', async () => {
    async function* lines() {
      yield 'first\n'
      await h.db.query('INSERT INTO children (parent) VALUES (42)')
      await insert('orphan-stream')
      yield 'second\n'
    }
    return Readable.from(lines())
  })

  app.get('/orphan-empty-stream', async () => {
    // Ends without a single chunk, so the commit fails before anything was written.
    async function* lines(): AsyncGenerator<string> {
      await h.db.query('INSERT INTO children (parent) VALUES (43)')
      await insert('orphan-empty-stream')
      yield* []
    }
    return Readable.from(lines())
  })

  app.get('/endless', async () => {
    await insert('endless')
    async function* lines() {
      try {
        for (;;) {
          await insert('endless-line')
          yield `${chunk}\n`
          await new Promise((r) => setTimeout(r, 1))
        }
      } finally {
        generatorFinished.open('finally ran')
      }
    }
    return Readable.from(lines())
  })

  // The reply is sent from an EventEmitter callback, outside AsyncLocalStorage.
  app.get('/from-bus', async (request, reply) => {
    await insert('bus')
    const mine = request.session.id
    bus.once('go', () => {
      async function* lines() {
        for (let i = 0; i < 3; i++) {
          const same = h.scope.getSession().id === mine
          await insert('bus-line')
          yield `line ${i} same=${same}\n`
        }
      }
      reply.send(Readable.from(lines()))
    })
    return reply
  })

  app.get('/web', async () => {
    await insert('web')
    let n = 0
    return new ReadableStream({
      async pull(controller) {
        if (n === 3) {
          controller.close()
          return
        }
        await insert('web-line')
        controller.enqueue(new TextEncoder().encode(`line ${n++}\n`))
      },
    })
  })
  ;({ base, port } = await listen(app))
})

afterAll(async () => {
  await app?.close()
  await h.close()
})

describe('a stream payload', () => {
  it('keeps its session until the body ends, then commits before the clean end', async () => {
    proceed = gate()
    sessionsSeen = []
    const released = h.releases()
    const res = await new Promise<http.IncomingMessage>((resolve, reject) => {
      http
        .get({ host: '127.0.0.1', port, path: '/report', agent: false }, resolve)
        .on('error', reject)
    })
    expect(res.statusCode).toBe(200)
    const first = await new Promise<Buffer>((resolve) => res.once('data', resolve))
    res.pause()
    expect(first.toString()).toBe('first\n')
    // Streaming: the session holds its connection, nothing is committed yet.
    expect(h.scope.holders().map((x) => x.name)).toEqual(['GET /report'])
    expect(await rowsOf('report-start')).toBe(0)
    proceed.open()
    // The client reads slowly, so the server waits for 'drain' between chunks.
    await new Promise((r) => setTimeout(r, 50))
    let bytes = first.length
    const ended = new Promise<void>((resolve, reject) => {
      res.on('data', (c: Buffer) => {
        bytes += c.length
      })
      res.on('end', resolve)
      res.on('error', reject)
    })
    res.resume()
    await ended
    // The clean end came after the COMMIT: every row is there the moment the body ended.
    expect(await rowsOf('report-start')).toBe(1)
    expect(await rowsOf('report-line')).toBe(8)
    expect(bytes).toBe(6 + 64 * chunk.length)
    expect(new Set(sessionsSeen).size).toBe(1)
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
  })

  it('a failed commit at the end cuts the response off: the client never sees a clean end', async () => {
    const released = h.releases()
    const outcome = await send(port, { path: '/orphan-stream' }).response.then(
      (r) => `clean end, status ${r.status}, body ${JSON.stringify(r.body)}`,
      (e: Error) => `cut off: ${e.message}`,
    )
    expect(outcome).toMatch(/^cut off/)
    expect(await rowsOf('orphan-stream')).toBe(0)
    expect(await committed(h, 'SELECT * FROM children')).toEqual([])
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
  })

  it('a failed commit before the first byte becomes a 500', async () => {
    const released = h.releases()
    const res = await fetch(`${base}/orphan-empty-stream`)
    expect(res.status).toBe(500)
    expect(((await res.json()) as { message: string }).message).toMatch(
      /was not committed.*foreign key/,
    )
    expect(await rowsOf('orphan-empty-stream')).toBe(0)
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
  })

  it('a client that goes away mid-stream: the source is stopped, everything rolls back, one release', async () => {
    generatorFinished = gate()
    const released = h.releases()
    const client = send(port, { path: '/endless' })
    client.response.catch(() => {})
    client.request.on('response', (res) => {
      let bytes = 0
      res.on('data', (c: Buffer) => {
        bytes += c.length
        if (bytes > 512 * 1024) client.abort()
      })
    })
    expect(await generatorFinished.promise).toBe('finally ran')
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await rowsOf('endless')).toBe(0)
    expect(await rowsOf('endless-line')).toBe(0)
  })

  it('a stream started outside AsyncLocalStorage still reads its source inside the request scope', async () => {
    const released = h.releases()
    const response = fetch(`${base}/from-bus`)
    await waitFor('the handler to wait for the bus', () => bus.listenerCount('go') === 1)
    bus.emit('go')
    const res = await response
    expect(await res.text()).toBe('line 0 same=true\nline 1 same=true\nline 2 same=true\n')
    expect(await rowsOf('bus')).toBe(1)
    expect(await rowsOf('bus-line')).toBe(3)
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
  })

  it('a web ReadableStream payload commits at its end too', async () => {
    const released = h.releases()
    const res = await fetch(`${base}/web`)
    expect(await res.text()).toBe('line 0\nline 1\nline 2\n')
    expect(await rowsOf('web')).toBe(1)
    expect(await rowsOf('web-line')).toBe(3)
    await waitFor('release', () => h.releases() - released === 1)
    await expectSettled(h)
  })
})
