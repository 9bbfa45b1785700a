/**
 * Client aborts and timeouts: the unit of work rolls back, the connection is
 * NOT released while the handler still runs (its next statement fails with a
 * clear error instead), it is released exactly once when the handler settles,
 * and with cancelOnAbort the running statement is cancelled on the server.
 * Covers aborts mid-handler and mid-upload, and Fastify's connectionTimeout,
 * requestTimeout and handlerTimeout.
 */
import type http from 'node:http'
import Fastify, { type FastifyHttpOptions, type FastifyInstance } from 'fastify'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
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
const apps: FastifyInstance[] = []

async function insert(tag: string): Promise<void> {
  await h.db.query('INSERT INTO events (tag) VALUES ($1)', [tag])
}

async function rowsOf(tag: string): Promise<number> {
  const rows = await committed(h, 'SELECT count(*)::int AS n FROM events WHERE tag = $1', [tag])
  return rows[0].n
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

/** What the handler saw of its last statement: 'completed', or the error's code/message. */
interface Seen {
  slept: 'completed' | string
  next: 'completed' | string
}

async function sleepThenInsert(tag: string, seconds: number): Promise<Seen> {
  const seen: Seen = { slept: 'completed', next: 'completed' }
  try {
    await h.db.query(`SELECT pg_sleep(${seconds})`)
  } catch (e) {
    seen.slept = (e as { code?: string }).code ?? (e as Error).message
  }
  try {
    await insert(`${tag}-after`)
  } catch (e) {
    seen.next = (e as Error).message
  }
  return seen
}

async function server(
  options: FastifyHttpOptions<http.Server>,
  plugin: { cancelOnAbort?: boolean },
  routes: (app: FastifyInstance) => void,
): Promise<number> {
  const app = Fastify(options)
  await app.register(scopedSession, { scope: h.scope, ...plugin })
  routes(app)
  apps.push(app)
  return (await listen(app)).port
}

beforeAll(async () => {
  h = await harness('fastify_abort', { max: 4 })
  await h.independent.query('CREATE TABLE events (id serial PRIMARY KEY, tag text NOT NULL)')
})

afterEach(async () => {
  await Promise.all(apps.splice(0).map((a) => a.close()))
})

afterAll(async () => {
  await h.close()
})

describe('a client that aborts mid-handler', () => {
  it('keeps the connection until the handler settles; its next statement fails with a clear error', async () => {
    const started = gate<AbortSignal>()
    const proceed = gate()
    const result = gate<string>()
    const port = await server({}, {}, (app) => {
      app.get('/slow', async (request) => {
        await insert('slow')
        started.open(request.session.signal)
        await proceed.promise
        try {
          await insert('slow-after')
          result.open('no error')
        } catch (e) {
          result.open((e as Error).message)
          throw e
        }
        return { ok: true }
      })
    })
    const released = h.releases()
    const client = send(port, { path: '/slow' })
    client.response.catch(() => {})
    const signal = await started.promise
    client.abort()
    await waitFor('the abort to reach the request scope', () => signal.aborted)
    // Aborted, rolled-back-only, but the handler still runs: the connection stays checked out.
    await new Promise((r) => setTimeout(r, 100))
    expect(h.scope.holders().map((x) => x.name)).toEqual(['GET /slow'])
    expect(h.pool.totalCount - h.pool.idleCount).toBe(1)
    expect(h.releases() - released).toBe(0)

    proceed.open()
    expect(await result.promise).toMatch(
      /Session 'GET \/slow' was aborted because the client closed the connection/,
    )
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await rowsOf('slow')).toBe(0)
    expect(await rowsOf('slow-after')).toBe(0)
  })

  it('without cancelOnAbort the running statement finishes, then the next one fails', async () => {
    const result = gate<Seen>()
    const port = await server({}, {}, (app) => {
      app.get('/sleep', async () => {
        await insert('nocancel')
        result.open(await sleepThenInsert('nocancel', 0.3))
        return { ok: true }
      })
    })
    const released = h.releases()
    const client = send(port, { path: '/sleep' })
    client.response.catch(() => {})
    await sleeping()
    client.abort()
    const seen = await result.promise
    expect(seen.slept).toBe('completed')
    expect(seen.next).toMatch(/aborted because the client closed the connection/)
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await rowsOf('nocancel')).toBe(0)
  })

  it('with cancelOnAbort the running pg_sleep is cancelled on the server', async () => {
    const result = gate<Seen>()
    const port = await server({}, { cancelOnAbort: true }, (app) => {
      app.get('/sleep', async () => {
        await insert('cancel')
        result.open(await sleepThenInsert('cancel', 30))
        return { ok: true }
      })
    })
    const released = h.releases()
    const client = send(port, { path: '/sleep' })
    client.response.catch(() => {})
    await sleeping()
    client.abort()
    const seen = await result.promise
    // 57014 query_canceled: "canceling statement due to user request", long before 30 s.
    expect(seen.slept).toBe('57014')
    expect(seen.next).toMatch(/aborted because the client closed the connection/)
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await rowsOf('cancel')).toBe(0)
  })
})

describe('a client that aborts during a large upload', () => {
  it('rolls back what the request did so far and releases once; the handler never runs', async () => {
    const hooked = gate()
    const port = await server({ bodyLimit: 64 * 1024 * 1024 }, {}, (app) => {
      app.post('/upload', {
        onRequest: async () => {
          await insert('upload')
          hooked.open()
        },
        handler: async () => {
          await insert('upload-handler')
          return { ok: true }
        },
      })
    })
    const released = h.releases()
    const client = send(port, {
      method: 'POST',
      path: '/upload',
      headers: { 'content-type': 'text/plain', 'content-length': 32 * 1024 * 1024 },
    })
    client.response.catch(() => {})
    client.request.write(Buffer.alloc(256 * 1024, 'a'))
    await hooked.promise
    client.request.write(Buffer.alloc(256 * 1024, 'b'))
    await new Promise((r) => setTimeout(r, 20))
    client.abort()
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await rowsOf('upload')).toBe(0)
    expect(await rowsOf('upload-handler')).toBe(0)
  })
})

describe('timeouts', () => {
  it('connectionTimeout: the idle socket is cut, the handler’s next statement fails, one release', async () => {
    const result = gate<Seen>()
    const port = await server({ connectionTimeout: 150 }, {}, (app) => {
      app.get('/idle', async () => {
        await insert('conn-timeout')
        result.open(await sleepThenInsert('conn-timeout', 0.5))
        return { ok: true }
      })
    })
    const released = h.releases()
    const client = send(port, { path: '/idle' })
    await expect(client.response).rejects.toThrow()
    const seen = await result.promise
    expect(seen.slept).toBe('completed')
    expect(seen.next).toMatch(/aborted because it ran past its time limit/)
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await rowsOf('conn-timeout')).toBe(0)
  })

  it('requestTimeout: a stalled upload gets a 408, what the request did rolls back, one release', async () => {
    const hooked = gate()
    const port = await server(
      // Node checks request timeouts every connectionsCheckingInterval, and only applies
      // requestTimeout when headersTimeout is not larger.
      {
        requestTimeout: 300,
        http: { connectionsCheckingInterval: 50, headersTimeout: 200 },
      } as Parameters<typeof Fastify>[0],
      {},
      (app) => {
        app.post('/stalled', {
          onRequest: async () => {
            await insert('req-timeout')
            hooked.open()
          },
          handler: async () => {
            await insert('req-timeout-handler')
            return { ok: true }
          },
        })
      },
    )
    const released = h.releases()
    const client = send(port, {
      method: 'POST',
      path: '/stalled',
      headers: { 'content-type': 'text/plain', 'content-length': 1000 },
    })
    client.request.write('only the first bytes')
    await hooked.promise
    expect((await client.response).status).toBe(408)
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await rowsOf('req-timeout')).toBe(0)
    expect(await rowsOf('req-timeout-handler')).toBe(0)
  })

  it('handlerTimeout: the 503 goes out at once, the connection stays until the handler settles', async () => {
    const result = gate<Seen>()
    const port = await server({}, {}, (app) => {
      app.get('/stuck', { handlerTimeout: 150 }, async () => {
        await insert('handler-timeout')
        result.open(await sleepThenInsert('handler-timeout', 0.6))
        return { ok: true }
      })
    })
    const released = h.releases()
    const res = await send(port, { path: '/stuck' }).response
    expect(res.status).toBe(503)
    // The handler is still in pg_sleep: its connection is not released under it.
    expect(h.scope.holders().map((x) => x.name)).toEqual(['GET /stuck'])
    const seen = await result.promise
    expect(seen.slept).toBe('completed')
    expect(seen.next).toMatch(/aborted because it ran past its time limit/)
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await rowsOf('handler-timeout')).toBe(0)
  })

  it('handlerTimeout with cancelOnAbort: the running statement is cancelled', async () => {
    const result = gate<Seen>()
    const port = await server({}, { cancelOnAbort: true }, (app) => {
      app.get('/stuck', { handlerTimeout: 150 }, async () => {
        await insert('handler-timeout-cancel')
        result.open(await sleepThenInsert('handler-timeout-cancel', 30))
        return { ok: true }
      })
    })
    const released = h.releases()
    const res = await send(port, { path: '/stuck' }).response
    expect(res.status).toBe(503)
    const seen = await result.promise
    expect(seen.slept).toBe('57014')
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await rowsOf('handler-timeout-cancel')).toBe(0)
  })

  it('handlerTimeout while a preHandler hook runs: 503, the hook’s next statement fails, rollback, one release', async () => {
    const result = gate<Seen>()
    const port = await server({}, {}, (app) => {
      app.get('/slow-hook', {
        handlerTimeout: 150,
        preHandler: async () => {
          await insert('hook-timeout')
          result.open(await sleepThenInsert('hook-timeout', 0.4))
        },
        handler: async () => {
          await insert('hook-timeout-handler')
          return { ok: true }
        },
      })
    })
    const released = h.releases()
    const res = await send(port, { path: '/slow-hook' }).response
    expect(res.status).toBe(503)
    const seen = await result.promise
    expect(seen.next).toMatch(/which is closed|ran past its time limit/)
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await rowsOf('hook-timeout')).toBe(0)
    expect(await rowsOf('hook-timeout-after')).toBe(0)
    expect(await rowsOf('hook-timeout-handler')).toBe(0)
  })
})
