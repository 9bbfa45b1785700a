/**
 * scopedFetch(app): the middleware's guarantees from outside Hono's chain —
 * commit before the response, a failed COMMIT answered by app.onError, every
 * outcome released once, getSession() everywhere in the app, nothing checked
 * out by a route that never queries, and the synchronous path kept for it.
 */
import { createScope, getSession, type Session, SessionClosedError } from '@scoped/core'
import { pgDriver } from '@scoped/pg'
import { Hono } from 'hono'
import { HTTPException } from 'hono/http-exception'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { defaultCommitOn, scopedFetch } from '../src/index.ts'
import {
  type Db,
  database,
  deferred,
  type Running,
  rowIds,
  serveFetch,
  settled,
  tally,
  until,
} from './support.ts'

let d: Db
let server: Running
const handled: unknown[] = []
const CONCURRENT = 12

const setup = `
  CREATE TABLE items (id text PRIMARY KEY);
  CREATE TABLE parents (id int PRIMARY KEY);
  CREATE TABLE children (
    id text PRIMARY KEY,
    parent_id int REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED
  );
`

/** Sessions named after the `x-test-id` header, so a tally can follow each request. */
const byTestId = (req: Request) => req.headers.get('x-test-id') ?? 'unnamed'

const lateWork = deferred<unknown>()

beforeAll(async () => {
  d = await database('hono_fetch', { setup, max: CONCURRENT + 4 })
  const insert = (id: string) => d.db.query('INSERT INTO items (id) VALUES ($1)', [id])

  const app = new Hono<{ Variables: { seenByMiddleware: string } }>()
  app.use('/mw/*', async (c, next) => {
    c.set('seenByMiddleware', d.scope.getSession().id)
    await next()
  })
  app.use('/mw-throws/*', async (c, next) => {
    await insert(c.req.header('x-test-id')!)
    throw new Error('auth middleware failed after its own statement')
    // biome-ignore lint/correctness/noUnreachable: next() is what it never gets to
    await next()
  })

  app.post('/items/:id', async (c) => {
    await insert(c.req.param('id'))
    return c.json({ id: c.req.param('id') }, 201)
  })
  app.post('/deferred/:id', async (c) => {
    // Accepted now, checked at COMMIT: parent 999 does not exist.
    await d.db.query('INSERT INTO children (id, parent_id) VALUES ($1, 999)', [c.req.param('id')])
    return c.json({ id: c.req.param('id') })
  })
  app.post('/throw/:id', async (c) => {
    await insert(c.req.param('id'))
    throw new Error('handler failed')
  })
  app.post('/throw-value/:id', async (c) => {
    await insert(c.req.param('id'))
    throw 'a string, not an Error'
  })
  app.post('/throw-object/:id', async (c) => {
    await insert(c.req.param('id'))
    throw { reason: 'a plain object' }
  })
  app.post('/status-500/:id', async (c) => {
    await insert(c.req.param('id'))
    return c.text('returned, not thrown', 500)
  })
  app.post('/status-404/:id', async (c) => {
    await insert(c.req.param('id'))
    return c.text('not found, but the work stands', 404)
  })
  app.post('/http-exception/:id', async (c) => {
    await insert(c.req.param('id'))
    throw new HTTPException(409, { message: 'conflict' })
  })
  app.post('/answered-400/:id', async (c) => {
    await insert(c.req.param('id'))
    throw new Error('answered with a 400 by onError')
  })
  app.post('/mw-throws/:id', (c) => c.text('never reached'))

  let arrived = 0
  const allArrived = deferred()
  app.get('/mw/who/:n', async (c) => {
    const session = d.scope.getSession()
    const pid = (await d.db.query('SELECT pg_backend_pid() AS pid')).rows[0].pid
    // Hold every request inside its unit of work until all of them are: they overlap for sure.
    if (++arrived === CONCURRENT) allArrived.resolve()
    await allArrived.promise
    const inTimer = await new Promise<{ id: string; pid: number }>((resolve, reject) => {
      setTimeout(() => {
        d.db
          .query('SELECT pg_backend_pid() AS pid')
          .then((r) => resolve({ id: d.scope.getSession().id, pid: r.rows[0].pid }), reject)
      }, 1)
    })
    return c.json({
      ids: [c.get('seenByMiddleware'), session.id, d.scope.getSession().id, inTimer.id],
      pids: [pid, inTimer.pid],
    })
  })
  app.get('/fire-and-forget', async (c) => {
    const session = d.scope.getSession()
    setTimeout(() => {
      session.use((client) => client.query('SELECT 1')).then(lateWork.resolve, lateWork.resolve)
    }, 50)
    return c.text('returned before the timer fired')
  })
  app.get('/no-db', (c) => c.text('no statement here'))

  // Set after scopedFetch() is made: the wrapper of app.errorHandler must follow.
  const fetch = scopedFetch(app, d.scope, { name: byTestId })
  app.onError((err, c) => {
    handled.push(err)
    if (err instanceof HTTPException) return err.getResponse()
    if (err.message.includes('400')) return c.text('bad request', 400)
    return c.text('Internal Server Error', 500)
  })
  server = await serveFetch(fetch)
})

afterAll(async () => {
  await server?.close()
  await d?.close()
})

describe('commit before the response', () => {
  it('a 201 response means the row is already visible to everyone (200 times in a row)', async () => {
    const observer = new pg.Client({ connectionString: d.url })
    await observer.connect()
    try {
      for (let i = 0; i < 200; i++) {
        const id = `visible-${i}`
        const res = await fetch(`${server.url}/items/${id}`, { method: 'POST' })
        expect(res.status).toBe(201)
        const { rowCount } = await observer.query('SELECT 1 FROM items WHERE id = $1', [id])
        expect(rowCount, `row ${id} visible when the client had its 201`).toBe(1)
        await res.text()
      }
    } finally {
      await observer.end()
    }
    await settled(d)
  })

  it('a COMMIT that fails (deferred constraint) is answered by app.onError: a 500, nothing stored', async () => {
    handled.length = 0
    const t = tally(d.scope.name, 'name')
    const res = await fetch(`${server.url}/deferred/orphan`, {
      method: 'POST',
      headers: { 'x-test-id': 'orphan' },
    })
    expect(res.status).toBe(500)
    expect(await res.text()).toBe('Internal Server Error')
    expect(handled).toHaveLength(1)
    expect((handled[0] as { code?: string }).code).toBe('23503')
    await settled(d)
    t.stop()
    expect(await rowIds(d.url, "SELECT id FROM children WHERE id = 'orphan'")).toEqual([])
    expect(t.releasesOf('orphan')).toBe(1)
    expect(d.pool.totalCount).toBe(d.pool.idleCount)
  })
})

describe('every outcome ends in exactly one release', () => {
  const cases = [
    { what: 'thrown Error', path: 'throw', status: 500, committed: false },
    { what: 'thrown string', path: 'throw-value', status: 500, committed: false },
    { what: 'thrown plain object', path: 'throw-object', status: 500, committed: false },
    { what: 'returned 500', path: 'status-500', status: 500, committed: false },
    { what: 'returned 404 (commits by default)', path: 'status-404', status: 404, committed: true },
    { what: 'thrown HTTPException 409', path: 'http-exception', status: 409, committed: false },
    {
      what: 'thrown Error that onError answers 400',
      path: 'answered-400',
      status: 400,
      committed: false,
    },
    { what: 'error in middleware', path: 'mw-throws', status: 500, committed: false },
  ]
  for (const c of cases) {
    it(`${c.what}: ${c.status}, ${c.committed ? 'committed' : 'rolled back'}`, async () => {
      const id = `case-${c.path}`
      const t = tally(d.scope.name, 'name')
      const res = await fetch(`${server.url}/${c.path}/${id}`, {
        method: 'POST',
        headers: { 'x-test-id': id },
      })
      expect(res.status).toBe(c.status)
      await res.text()
      await settled(d)
      t.stop()
      expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual(
        c.committed ? [id] : [],
      )
      expect(t.acquiresOf(id)).toBe(1)
      expect(t.releasesOf(id)).toBe(1)
      expect(d.pool.totalCount).toBe(d.pool.idleCount)
    })
  }

  it('a 404 from no route at all: nothing checked out, the scope ended', async () => {
    const before = d.scope.stats().totals.acquired
    const res = await fetch(`${server.url}/nowhere`)
    expect(res.status).toBe(404)
    await settled(d)
    expect(d.scope.stats().totals.acquired).toBe(before)
  })
})

describe('commitOn', () => {
  it('decides for every response; a thrown exception rolls back even when its response is a 2xx', async () => {
    const app = new Hono()
    app.post('/:status/:id', async (c) => {
      await d.db.query('INSERT INTO items (id) VALUES ($1)', [c.req.param('id')])
      if (c.req.header('x-throw')) throw new HTTPException(201, { message: 'thrown' })
      return c.text('ok', Number(c.req.param('status')) as 200)
    })
    const strict = await serveFetch(
      scopedFetch(app, d.scope, { commitOn: ({ status, error }) => !error && status < 400 }),
    )
    try {
      const call = (status: number, id: string, thrown = false) =>
        fetch(`${strict.url}/${status}/${id}`, {
          method: 'POST',
          headers: thrown ? { 'x-throw': '1' } : {},
        }).then((r) => r.status)
      expect(await call(200, 'strict-200')).toBe(200)
      expect(await call(404, 'strict-404')).toBe(404)
      expect(await call(200, 'strict-thrown', true)).toBe(201)
      await settled(d)
      expect(await rowIds(d.url, "SELECT id FROM items WHERE id LIKE 'strict-%'")).toEqual([
        'strict-200',
      ])
      expect(d.pool.totalCount).toBe(d.pool.idleCount)
    } finally {
      await strict.close()
    }
  })

  it('a commitOn that accepts a thrown error keeps the work (a thrown 409 that is an answer)', async () => {
    const app = new Hono()
    app.post('/:id/:status', async (c) => {
      await d.db.query('INSERT INTO items (id) VALUES ($1)', [c.req.param('id')])
      throw new HTTPException(Number(c.req.param('status')) as 409, { message: 'thrown' })
    })
    const s = await serveFetch(
      scopedFetch(app, d.scope, {
        commitOn: (o) =>
          (o.error as HTTPException | undefined)?.status === 409 || defaultCommitOn(o),
      }),
    )
    try {
      expect((await fetch(`${s.url}/kept-409/409`, { method: 'POST' })).status).toBe(409)
      expect((await fetch(`${s.url}/gone-400/400`, { method: 'POST' })).status).toBe(400)
      await settled(d)
      expect(
        await rowIds(d.url, "SELECT id FROM items WHERE id IN ('kept-409', 'gone-400')"),
      ).toEqual(['kept-409'])
    } finally {
      await s.close()
    }
  })
})

describe('getSession() inside a request', () => {
  it('is the same session in middleware, the handler, a helper and a timer; concurrent requests never share', async () => {
    const results = await Promise.all(
      Array.from({ length: CONCURRENT }, (_, n) =>
        fetch(`${server.url}/mw/who/${n}`).then(
          (r) => r.json() as Promise<{ ids: string[]; pids: number[] }>,
        ),
      ),
    )
    const sessionIds = new Set<string>()
    const pids = new Set<number>()
    for (const r of results) {
      expect(new Set(r.ids).size, `one session per request: ${r.ids}`).toBe(1)
      expect(r.pids[0]).toBe(r.pids[1])
      sessionIds.add(r.ids[0]!)
      pids.add(r.pids[0]!)
    }
    expect(sessionIds.size).toBe(CONCURRENT)
    expect(pids.size).toBe(CONCURRENT)
    await settled(d)
  })

  it('a route that runs no statement checks out no connection and makes no session', async () => {
    const before = d.scope.stats().totals.acquired
    for (let i = 0; i < 20; i++) {
      const res = await fetch(`${server.url}/no-db`)
      expect(await res.text()).toBe('no statement here')
    }
    await settled(d)
    expect(d.scope.stats().totals.acquired).toBe(before)
  })

  it('work that outlives its request fails loudly instead of using a released connection', async () => {
    const res = await fetch(`${server.url}/fire-and-forget`)
    expect(res.status).toBe(200)
    const late = await lateWork.promise
    expect(late).toBeInstanceOf(SessionClosedError)
    await settled(d)
  })
})

describe('the synchronous path', () => {
  it('a handler that answers synchronously and makes no session gets its Response back synchronously, the scope already ended', async () => {
    const app = new Hono()
    let inside = false
    app.get('/sync', (c) => {
      inside = d.scope.hasSession()
      return c.text('sync')
    })
    app.get('/async', async (c) => c.text('async'))
    const fetch = scopedFetch(app, d.scope)
    const open = d.scope.stats().open
    const res = fetch(new Request('http://x/sync'))
    expect(res).toBeInstanceOf(Response)
    expect(inside).toBe(true)
    expect(d.scope.stats().open).toBe(open)
    expect(await (res as Response).text()).toBe('sync')
    // An async handler: Hono itself returns a promise; the scope still ends without a checkout.
    const later = fetch(new Request('http://x/async'))
    expect(later).toBeInstanceOf(Promise)
    expect(await (await later).text()).toBe('async')
    expect(d.scope.stats().open).toBe(open)
  })

  it('a synchronous handler that throws an Error answered with a 4xx, behind middleware or not: rolled back', async () => {
    const app = new Hono()
    app.use('/behind/*', async (_c, next) => next())
    const handler = (c: { req: { param(k: string): string } }) => {
      const id = c.req.param('id')
      getSessionOf(d).use((client) => client.query('INSERT INTO items (id) VALUES ($1)', [id]))
      throw new Error('refused')
    }
    app.post('/alone/:id', handler)
    app.post('/behind/:id', handler)
    app.onError((_e, c) => c.text('refused', 422))
    const s = await serveFetch(scopedFetch(app, d.scope))
    try {
      for (const path of ['alone/sync-thrown-a', 'behind/sync-thrown-b']) {
        const res = await fetch(`${s.url}/${path}`, { method: 'POST' })
        expect(res.status).toBe(422)
      }
      await settled(d)
      expect(await rowIds(d.url, "SELECT id FROM items WHERE id LIKE 'sync-thrown-%'")).toEqual([])
    } finally {
      await s.close()
    }
  })

  it('a synchronous handler that queries later (a session made, a statement run) still commits before the response', async () => {
    const app = new Hono()
    app.get('/sync-session/:id', (c) => {
      // A session made synchronously; its statement settles after the handler returned.
      const id = c.req.param('id')
      getSessionOf(d).use((client) => client.query('INSERT INTO items (id) VALUES ($1)', [id]))
      return c.text('queued')
    })
    const s = await serveFetch(scopedFetch(app, d.scope))
    try {
      const res = await fetch(`${s.url}/sync-session/sync-queued`)
      expect(res.status).toBe(200)
      expect(await rowIds(d.url, "SELECT id FROM items WHERE id = 'sync-queued'")).toEqual([
        'sync-queued',
      ])
      await settled(d)
    } finally {
      await s.close()
    }
  })
})

function getSessionOf(db: Db): Session<pg.PoolClient> {
  return db.scope.getSession()
}

describe('names', () => {
  it('default: the method and the route pattern, worked out when the session is made', async () => {
    const app = new Hono()
    app.use(async (_c, next) => next())
    app.get('/orders/:id', (c) => c.text(d.scope.getSession().name))
    app.post('/orders', async (c) => c.text(d.scope.getSession().name))
    const api = new Hono()
    api.get('/users/:id', (c) => c.text(d.scope.getSession().name))
    app.route('/api', api)
    app.notFound((c) => c.text(d.scope.getSession().name, 404))
    const fetch = scopedFetch(app, d.scope)
    const name = async (path: string, method = 'GET') =>
      (await fetch(new Request(`http://x${path}`, { method }))).text()
    expect(await name('/orders/7')).toBe('GET /orders/:id')
    expect(await name('/orders', 'POST')).toBe('POST /orders')
    expect(await name('/api/users/3')).toBe('GET /api/users/:id')
    expect(await name('/nowhere/at/all')).toBe('GET *')
  })

  it('a custom name(request) names the session; a bad one fails the request with a clear error', async () => {
    const app = new Hono()
    app.get('/x', (c) => c.text(d.scope.getSession().name))
    const named = scopedFetch(app, d.scope, {
      name: (req) => `custom ${new URL(req.url).pathname}`,
    })
    expect(await (await named(new Request('http://x/x'))).text()).toBe('custom /x')
    const bad = scopedFetch(app, d.scope, { name: () => '' })
    expect(() => bad(new Request('http://x/x'))).toThrow(
      /scopedFetch\(app, scope, \{ name \}\): name\(request\) must return a non-empty string, got ""/,
    )
  })
})

describe('setting it up', () => {
  it('uses the default scope, looked up when scopedFetch() is called', async () => {
    const app = new Hono()
    app.get('/', (c) => c.text(String(getSession().name)))
    expect(() => scopedFetch(app)).toThrow(/no default scope.*createScope\(\{ driver \}\)/)
    const pool = new pg.Pool({ connectionString: d.url, max: 1 })
    const scope = createScope({ driver: pgDriver(pool), name: 'hono_fetch_default' })
    try {
      const fetch = scopedFetch(app)
      expect(await (await fetch(new Request('http://x/'))).text()).toBe('GET /')
    } finally {
      await scope.close()
    }
  })

  it('rejects wrong arguments and options with a TypeError that names them', () => {
    const app = new Hono()
    expect(() => scopedFetch({} as never, d.scope)).toThrow(/expected a Hono app, got object/)
    expect(() => scopedFetch(app, { name: () => 'x' } as never)).toThrow(
      /pass undefined as the scope: scopedFetch\(app, undefined, options\)/,
    )
    expect(() => scopedFetch(app, d.scope, { cancelOnAbort: 'yes' } as never)).toThrow(
      /scopedFetch\(app, scope, \{ cancelOnAbort \}\): expected a boolean, got "yes"/,
    )
    expect(() => scopedFetch(app, d.scope, { nme: 1 } as never)).toThrow(
      /scopedFetch\(app, scope, \{ nme \}\): unknown option/,
    )
  })

  it('warns once about sub-apps with an onError of their own, whose errors it cannot see', async () => {
    const warnings: string[] = []
    const pool = new pg.Pool({ connectionString: d.url, max: 1 })
    const scope = createScope({
      driver: pgDriver(pool),
      name: 'hono_fetch_warn',
      default: false,
      logger: { warn: (m: string) => warnings.push(m), error: () => {} },
    })
    try {
      const app = new Hono()
      const api = new Hono()
      api.onError((_e, c) => c.text('sub-app answer', 400))
      api.get('/thing', () => {
        throw new Error('x')
      })
      app.route('/api', api)
      const fetch = scopedFetch(app, scope)
      expect((await fetch(new Request('http://x/api/thing'))).status).toBe(400)
      await fetch(new Request('http://x/api/thing'))
      expect(warnings).toHaveLength(1)
      expect(warnings[0]).toMatch(/sub-app with its own onError \(GET \/api\/thing\)/)
    } finally {
      await scope.close()
    }
  })

  it('the app can still be served by app.fetch and by scopedSession() users: its errorHandler is only wrapped', async () => {
    const app = new Hono()
    app.onError((_e, c) => c.text('mine', 418))
    app.get('/boom', () => {
      throw new Error('boom')
    })
    scopedFetch(app, d.scope)
    expect((await app.request('/boom')).status).toBe(418)
    await until(() => d.scope.stats().open === 0, 'no scope left open')
  })
})
