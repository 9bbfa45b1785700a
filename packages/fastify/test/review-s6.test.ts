/**
 * Session 6 review probes: the README's claims, one by one, over a real
 * server on 127.0.0.1, real sockets and a real PostgreSQL. Each test names the
 * claim it checks. A test marked `it.fails` asserts what the README promises
 * where the library does otherwise (its comment quotes the sentence and says
 * what happens); the others are regression tests of claims that hold.
 */
import http from 'node:http'
import Fastify, { type FastifyInstance, type FastifyServerOptions } from 'fastify'
import pg from 'pg'
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { scopedSession } from '../src/index.ts'
import { committed, expectSettled, gate, type Harness, harness, listen, send } from './support.ts'

let h: Harness
const apps: FastifyInstance[] = []

beforeAll(async () => {
  h = await harness('fastify_review_s6', { max: 5 })
  await h.independent.query('CREATE TABLE items (id text PRIMARY KEY)')
  await h.independent.query('CREATE TABLE parents (id int PRIMARY KEY)')
  await h.independent.query(
    'CREATE TABLE children (id text PRIMARY KEY, parent int REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)',
  )
})

afterEach(async () => {
  await Promise.all(apps.splice(0).map((a) => a.close()))
})

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

const errorName = (e: unknown) => (e as Error).name

async function app(
  setup: (app: FastifyInstance) => void | Promise<void>,
  plugin: Record<string, unknown> = {},
  options: FastifyServerOptions = {},
) {
  const a = Fastify(options)
  apps.push(a)
  await a.register(scopedSession, { scope: h.scope, ...plugin })
  await setup(a)
  const { base, port } = await listen(a)
  return { app: a, base, port }
}

describe('a failed COMMIT', () => {
  // README (lifecycle, onSend): "A COMMIT that fails becomes a 500 (TransactionStateError, "was not
  // committed", the database's reason as cause)."
  it('is a 500 whose error is a TransactionStateError saying "was not committed", with the database error as cause', async () => {
    const seen: unknown[] = []
    const { base } = await app((a) => {
      a.post('/orphan/:id', async (req, reply) => {
        await insertOrphan((req.params as { id: string }).id)
        return reply.code(201).send({ ok: true })
      })
      a.setErrorHandler((err, _req, reply) => {
        seen.push(err)
        return reply.code(500).send({ message: (err as Error).message })
      })
    })
    const res = await fetch(`${base}/orphan/fc-1`, { method: 'POST' })
    expect(res.status).toBe(500)
    const body = (await res.json()) as { message: string }
    expect(body.message).toMatch(/was not committed/)
    expect(seen).toHaveLength(1)
    const err = seen[0] as Error & { cause?: { code?: string } }
    expect(err.name).toBe('TransactionStateError')
    expect(err.cause?.code).toBe('23503')
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await exists('children', 'fc-1')).toBe(false)
  })
})

describe('the order: release, then write', () => {
  // README (lifecycle, onSend): "COMMITs or ROLLs BACK, releases the connection, **then** lets
  // Fastify write the response." and (Decisions) "Rollbacks happen before the error response is
  // written, like commits". The server is in this process: when the client has the status line,
  // the connection must already be back in the pool.
  it('when the client has the status of a committed 201 or a rolled-back 500, the connection is already idle in the pool', async () => {
    const { port } = await app((a) => {
      a.post('/ok/:id', async (req, reply) => {
        await insert((req.params as { id: string }).id)
        return reply.code(201).send('ok')
      })
      a.post('/fail/:id', async (req) => {
        await insert((req.params as { id: string }).id)
        throw new Error('handler failed')
      })
    })
    const atStatus = (path: string) =>
      new Promise<{ status: number; idle: boolean; holding: number }>((resolve, reject) => {
        const req = http.request({ host: '127.0.0.1', port, path, method: 'POST', agent: false })
        req.on('error', reject)
        req.on('response', (res) => {
          const snapshot = {
            status: res.statusCode ?? 0,
            idle: h.pool.totalCount === h.pool.idleCount,
            holding: h.scope.stats().holding,
          }
          res.resume()
          res.on('end', () => resolve(snapshot))
        })
        req.end()
      })
    expect(await atStatus('/ok/order-1')).toEqual({ status: 201, idle: true, holding: 0 })
    expect(await atStatus('/fail/order-2')).toEqual({ status: 500, idle: true, holding: 0 })
    await expectSettled(h)
    expect(await exists('items', 'order-1')).toBe(true)
    expect(await exists('items', 'order-2')).toBe(false)
  })
})

describe('commitOn', () => {
  // README (options): "`error` is the first error thrown anywhere in the chain (a thrown non-Error
  // counts; `throw undefined` is reported as an `Error`)."
  it('sees the first error (not the error handler’s own), a thrown string as is, and throw undefined as an Error', async () => {
    const asked: unknown[] = []
    const { base } = await app(
      (a) => {
        a.get('/string', async () => {
          await insert('cm-string')
          throw 'a string'
        })
        a.get('/undefined', async () => {
          await insert('cm-undefined')
          throw undefined
        })
        a.get('/first', async () => {
          await insert('cm-first')
          throw new Error('first')
        })
        a.setErrorHandler((err, req, reply) => {
          if (req.url === '/first') throw new Error('second, from the error handler')
          return reply.code(500).send(String(err))
        })
      },
      {
        commitOn: ({ error }: { status: number; error?: unknown }) => {
          asked.push(error)
          return false
        },
      },
    )
    for (const p of ['/string', '/undefined', '/first']) {
      const res = await fetch(base + p)
      expect(res.status).toBe(500)
      await res.arrayBuffer()
    }
    await expectSettled(h)
    expect(asked).toHaveLength(3)
    expect(asked[0]).toBe('a string')
    expect(asked[1]).toBeInstanceOf(Error)
    expect((asked[2] as Error).message).toBe('first')
  })

  // README (options): "An aborted or timed-out request never commits, whatever it returns."
  it('a commitOn that always says yes: a request whose client left still rolls back, one release', async () => {
    const inserted = gate()
    const finished = gate<string>()
    const { port } = await app(
      (a) => {
        a.get('/abort/:id', async (req) => {
          const session = h.scope.getSession()
          const gone = new Promise<void>((r) => session.signal.addEventListener('abort', () => r()))
          await insert((req.params as { id: string }).id)
          inserted.open()
          await gone
          finished.open('returned')
          return 'ok' // no statement after the abort: only commitOn could keep the work
        })
      },
      { commitOn: () => true },
    )
    const call = send(port, { path: '/abort/ab-yes-1' })
    call.response.catch(() => {})
    await inserted.promise
    call.abort()
    expect(await finished.promise).toBe('returned')
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await exists('items', 'ab-yes-1')).toBe(false)
  })

  it('a commitOn that always says yes: a handlerTimeout (503) still rolls back once the handler settles', async () => {
    const finished = gate()
    const { base } = await app(
      (a) => {
        a.get('/slow/:id', async (req) => {
          await insert((req.params as { id: string }).id)
          await new Promise((r) => setTimeout(r, 300))
          finished.open()
          return 'late'
        })
      },
      { commitOn: () => true },
      { handlerTimeout: 100 } as FastifyServerOptions,
    )
    const res = await fetch(`${base}/slow/ht-yes-1`)
    expect(res.status).toBe(503)
    await res.arrayBuffer()
    await finished.promise
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await exists('items', 'ht-yes-1')).toBe(false)
  })
})

describe('work around reply.send()', () => {
  // README (Decisions): "Work after `reply.send()` in the same handler runs after the unit of work
  // ended: its statements fail with `SessionClosedError`."
  it('a statement right after reply.send() in the same handler fails with SessionClosedError; what ran before is committed', async () => {
    const after = gate<string>()
    const { base } = await app((a) => {
      a.post('/send-then/:id', async (req, reply) => {
        const { id } = req.params as { id: string }
        await insert(id)
        reply.code(201).send({ id })
        try {
          await insert(`${id}-after`)
          after.open('completed')
        } catch (e) {
          after.open(errorName(e))
        }
        return reply
      })
    })
    const res = await fetch(`${base}/send-then/st-1`, { method: 'POST' })
    expect(res.status).toBe(201)
    await res.arrayBuffer()
    expect(await after.promise).toBe('SessionClosedError')
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await exists('items', 'st-1')).toBe(true)
    expect(await exists('items', 'st-1-after')).toBe(false)
  })
})

describe('hooks', () => {
  // README (Decisions): "Hooks are not tracked, the handler is. If the client goes away while a hook
  // (not the handler) runs, the connection is released right after the hook's running statement;
  // the hook's next statement fails."
  it('a client gone while a preHandler hook runs a statement: the hook’s next statement fails, rollback, one release', async () => {
    const sleepStarted = gate()
    const hookNext = gate<string>()
    const { port } = await app((a) => {
      a.get(
        '/hooked/:id',
        {
          preHandler: async (req) => {
            await insert((req.params as { id: string }).id)
            const sleep = h.db.query('SELECT pg_sleep(0.3)')
            sleepStarted.open()
            await sleep
            try {
              await insert(`${(req.params as { id: string }).id}-next`)
              hookNext.open('completed')
            } catch (e) {
              hookNext.open(errorName(e))
            }
          },
        },
        async () => 'ok',
      )
    })
    const call = send(port, { path: '/hooked/hk-1' })
    call.response.catch(() => {})
    await sleepStarted.promise
    await new Promise((r) => setTimeout(r, 50))
    call.abort()
    expect(['ScopeAbortedError', 'SessionClosedError']).toContain(await hookNext.promise)
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await exists('items', 'hk-1')).toBe(false)
  })
})

describe('hooks around the response', () => {
  // README (lifecycle): the plugin decides in `onSend`; a `preSerialization` hook runs before it, so
  // its statement belongs to the unit of work and commits with it.
  it('a preSerialization hook that writes: committed with the handler’s work before the response', async () => {
    const { base } = await app((a) => {
      a.post(
        '/ser/:id',
        {
          preSerialization: async (req, _reply, payload) => {
            await insert(`${(req.params as { id: string }).id}-ser`)
            return payload
          },
        },
        async (req) => {
          await insert((req.params as { id: string }).id)
          return { ok: true }
        },
      )
    })
    const res = await fetch(`${base}/ser/ps-1`, { method: 'POST' })
    expect(res.status).toBe(200)
    // Visible the moment the client has the response.
    expect(await exists('items', 'ps-1')).toBe(true)
    expect(await exists('items', 'ps-1-ser')).toBe(true)
    await res.arrayBuffer()
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
  })

  // README (Decisions): "`onSend` hooks added after the plugin run **after** the COMMIT". An audit
  // hook there that queries is work after the unit of work: it fails with SessionClosedError and
  // the committed work stays.
  it('an onSend hook added after the plugin that queries: its statement fails with SessionClosedError, the handler’s work stays committed', async () => {
    const audit = gate<string>()
    const { base } = await app((a) => {
      a.addHook('onSend', async (req, _reply, payload) => {
        try {
          await insert(`${(req.params as { id: string }).id}-audit`)
          audit.open('completed')
        } catch (e) {
          audit.open(errorName(e))
        }
        return payload
      })
      a.post('/audited/:id', async (req) => {
        await insert((req.params as { id: string }).id)
        return { ok: true }
      })
    })
    const res = await fetch(`${base}/audited/au-1`, { method: 'POST' })
    expect(res.status).toBe(200)
    await res.arrayBuffer()
    expect(await audit.promise).toBe('SessionClosedError')
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await exists('items', 'au-1')).toBe(true)
    expect(await exists('items', 'au-1-audit')).toBe(false)
  })
})

describe('two scopes on one app', () => {
  // README (Decisions and limits): "Two scopes commit one after the other, not atomically … the
  // scope registered first commits first, then the second. If the first one's COMMIT fails, the 500
  // … passes through the second one's `onSend`, which rolls back … If the second one's COMMIT
  // fails, the first has already committed: the client gets the 500 and the first database keeps
  // its work."
  //
  // The first scope failing holds: its onSend hook runs first, its failed COMMIT is the 500, and the
  // second scope, asked about a 500, rolls back.
  // LIMIT (second; documented there, kept as it.fails): onSend hooks run in registration order, so
  // the first scope has COMMITted before the second one's COMMIT fails: the client gets a 500 while
  // the first database keeps the row (kept: { first: 1, second: 0 }). Without two-phase commit one
  // order of failure always does this (in @scoped/hono and @scoped/express too, with the inner,
  // later-mounted scope committing first: see their review-s6).
  for (const failing of ['first', 'second'] as const) {
    ;(failing === 'second' ? it.fails : it)(
      `the ${failing} registered scope's COMMIT fails: a 500, and neither scope keeps the work`,
      async () => {
        const other = await harness(`fastify_review_s6_${failing}`, { max: 2 })
        await other.independent.query('CREATE TABLE items (id text PRIMARY KEY)')
        await other.independent.query('CREATE TABLE parents (id int PRIMARY KEY)')
        await other.independent.query(
          'CREATE TABLE children (id text PRIMARY KEY, parent int REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)',
        )
        const otherReleased = other.releases()
        try {
          const a = Fastify()
          apps.push(a)
          await a.register(scopedSession, { scope: h.scope })
          await a.register(scopedSession, { scope: other.scope, decorate: false })
          a.post('/two/:id', async (request) => {
            const { id } = request.params as { id: string }
            if (failing === 'first') {
              await insertOrphan(id)
              await other.db.query('INSERT INTO items (id) VALUES ($1)', [id])
            } else {
              await insert(id)
              await other.db.query('INSERT INTO children (id, parent) VALUES ($1, 999)', [id])
            }
            return { ok: true }
          })
          const { base } = await listen(a)
          const res = await fetch(`${base}/two/two-${failing}`, { method: 'POST' })
          const status = res.status
          await res.arrayBuffer()
          await expectSettled(h)
          await expectSettled(other)
          expect(h.releases() - released).toBe(1)
          expect(other.releases() - otherReleased).toBe(1)
          const id = `two-${failing}`
          const rowsOf = (x: Harness) =>
            committed(
              x,
              'SELECT id FROM items WHERE id = $1 UNION ALL SELECT id FROM children WHERE id = $1',
              [id],
            )
          const kept = { first: (await rowsOf(h)).length, second: (await rowsOf(other)).length }
          expect({ status, kept }).toEqual({ status: 500, kept: { first: 0, second: 0 } })
        } finally {
          await other.close()
        }
      },
    )
  }
})

describe('HEAD', () => {
  // README (lifecycle): a plain payload is committed in onSend before Fastify writes the response,
  // and "A COMMIT that fails becomes a 500". Fastify answers HEAD by running the GET route.
  it('HEAD of a GET route whose COMMIT fails: the head says 500, nothing stored, one release', async () => {
    const { port } = await app((a) => {
      a.get('/head/:id', async (req) => {
        await insertOrphan((req.params as { id: string }).id)
        return { ok: true }
      })
    })
    const status = await new Promise<number>((resolve, reject) => {
      const req = http.request({
        host: '127.0.0.1',
        port,
        path: '/head/hd-1',
        method: 'HEAD',
        agent: false,
      })
      req.on('error', reject)
      req.on('response', (res) => {
        res.resume()
        res.on('end', () => resolve(res.statusCode ?? 0))
      })
      req.end()
    })
    expect(status).toBe(500)
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    expect(await exists('children', 'hd-1')).toBe(false)
  })
})

describe('a throw after reply.send()', () => {
  // README (onSend, plain payload): commitOn decides in onSend, then Fastify writes the response. A
  // handler that answers, then throws in the same turn (a bug after the answer): what the client
  // sees and what is saved must agree.
  it('reply.send() then a throw in the same turn: the client’s answer and the saved work agree, one release', async () => {
    const { port } = await app((a) => {
      a.post('/answer-throw/:id', async (req, reply) => {
        const { id } = req.params as { id: string }
        await insert(id)
        reply.code(201).send({ id })
        throw new Error('a bug after the answer')
      })
    })
    const r = await new Promise<{ status: number; complete: boolean; body: string }>((resolve) => {
      const req = http.request({
        host: '127.0.0.1',
        port,
        path: '/answer-throw/at-1',
        method: 'POST',
        agent: false,
      })
      req.on('error', () => resolve({ status: 0, complete: false, body: '' }))
      req.on('response', (res) => {
        let body = ''
        res.setEncoding('utf8')
        res.on('data', (c: string) => {
          body += c
        })
        res.on('end', () => resolve({ status: res.statusCode ?? 0, complete: res.complete, body }))
        res.on('aborted', () => resolve({ status: res.statusCode ?? 0, complete: false, body }))
      })
      req.end()
    })
    await expectSettled(h)
    expect(h.releases() - released).toBe(1)
    const saved = await exists('items', 'at-1')
    expect({ status: r.status, complete: r.complete, saved }).toEqual(
      saved
        ? { status: 201, complete: true, saved: true }
        : { status: 500, complete: true, saved: false },
    )
  })
})

describe('a timeout while the COMMIT runs', () => {
  // README (handlerTimeout): "Fastify answers 503 while the handler runs. … the scope is aborted as a
  // timeout". Here the handler has returned and the COMMIT (in onSend) is blocked on another
  // transaction's lock past handlerTimeout. What the client sees and what is saved must agree.
  it('handlerTimeout while the COMMIT is blocked: the client’s answer and the saved work agree, one release', async () => {
    await h.independent.query(
      `CREATE TABLE IF NOT EXISTS uniq (k text,
         CONSTRAINT uniq_k UNIQUE (k) DEFERRABLE INITIALLY DEFERRED)`,
    )
    const blocker = new pg.Client({ connectionString: h.url })
    await blocker.connect()
    await blocker.query('BEGIN')
    await blocker.query(`INSERT INTO uniq (k) VALUES ('fy-blocked-1')`)
    try {
      const { port } = await app(
        (a) => {
          a.post('/blocked', async (_req, reply) => {
            await h.db.query(`INSERT INTO uniq (k) VALUES ('fy-blocked-1')`)
            return reply.code(201).send('saved')
          })
        },
        {},
        { handlerTimeout: 150 } as FastifyServerOptions,
      )
      const call = send(port, { method: 'POST', path: '/blocked', body: '' })
      const result = call.response.then(
        (r) => ({ status: r.status, body: r.body, complete: true }),
        () => ({ status: 0, body: '', complete: false }),
      )
      await new Promise((r) => setTimeout(r, 400))
      await blocker.query('ROLLBACK') // the COMMIT can now succeed
      const r = await result
      await expectSettled(h)
      expect(h.releases() - released).toBe(1)
      const saved = (await committed(h, `SELECT 1 FROM uniq WHERE k = 'fy-blocked-1'`)).length === 1
      expect({ ...r, saved }).toEqual(
        saved
          ? { status: 201, body: 'saved', complete: true, saved: true }
          : { status: 503, body: r.body, complete: true, saved: false },
      )
    } finally {
      await blocker.end()
    }
  })
})

describe('a failed COMMIT and the headers set before the handler', () => {
  // README (lifecycle): "A COMMIT that fails becomes a 500". A browser can only read that 500 if it
  // keeps the CORS headers an earlier hook set (as @fastify/cors does, in onRequest); the
  // handler's Set-Cookie must go (review-s4).
  it('the 500 keeps Access-Control-Allow-Origin and a request-id header set in onRequest, drops the handler’s Set-Cookie', async () => {
    const { base } = await app((a) => {
      a.addHook('onRequest', async (_req, reply) => {
        reply.header('access-control-allow-origin', 'https://example.test')
        reply.header('x-request-id', 'rid-1')
      })
      a.post('/orphan/:id', async (req, reply) => {
        await insertOrphan((req.params as { id: string }).id)
        reply.header('set-cookie', 'order=1')
        return reply.code(201).send({ ok: true })
      })
    })
    const res = await fetch(`${base}/orphan/cors-1`, { method: 'POST' })
    expect(res.status).toBe(500)
    await res.arrayBuffer()
    await expectSettled(h)
    expect(res.headers.get('set-cookie')).toBeNull()
    expect(res.headers.get('access-control-allow-origin')).toBe('https://example.test')
    expect(res.headers.get('x-request-id')).toBe('rid-1')
    expect(await exists('children', 'cors-1')).toBe(false)
  })

  // Session 6: the handler's caching claims go with its response. A cacheable GET that also
  // writes (a view counter) sets `Cache-Control: public, max-age=3600` and an Expires; a shared
  // cache may store any status that carries them, so a CDN would serve the 500 for an hour.
  it('the 500 drops the handler’s Cache-Control: public, max-age=3600 and Expires, keeps Vary and a custom header', async () => {
    const { base } = await app((a) => {
      a.get('/page/:id', async (req, reply) => {
        await insertOrphan((req.params as { id: string }).id)
        reply.header('cache-control', 'public, max-age=3600')
        reply.header('expires', new Date(Date.now() + 3_600_000).toUTCString())
        reply.header('vary', 'Accept-Language')
        reply.header('x-trace', 't-1')
        return reply.type('text/plain').send('a page')
      })
    })
    const res = await fetch(`${base}/page/cc-1`)
    expect(res.status).toBe(500)
    await res.arrayBuffer()
    await expectSettled(h)
    expect({
      cacheControl: res.headers.get('cache-control'),
      expires: res.headers.get('expires'),
      vary: res.headers.get('vary'),
      trace: res.headers.get('x-trace'),
    }).toEqual({ cacheControl: null, expires: null, vary: 'Accept-Language', trace: 't-1' })
    expect(await exists('children', 'cc-1')).toBe(false)
  })
})
