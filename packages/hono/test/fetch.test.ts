/**
 * scopedFetch(app)'s own: the synchronous path kept for a route that never
 * queries, names from the route or from name(request), and how it is set up.
 * What it shares with the middleware (commit before the response, a failed
 * COMMIT answered by app.onError, every outcome released once, getSession()
 * everywhere in the app, aborts, timeouts, streams) is tested for both entry
 * points in commit, session, abort, stream, soak and timeout-waiting.test.ts.
 */
import { getRequestListener } from '@hono/node-server'
import { createScope, getSession, type Session } from '@scoped/core'
import { pgDriver } from '@scoped/pg'
import { Hono } from 'hono'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { scopedFetch, scopedSession } from '../src/index.ts'
import { type Db, database, rowIds, serveFetch, settled, until } from './support.ts'

let d: Db

beforeAll(async () => {
  d = await database('hono_fetch', { setup: 'CREATE TABLE items (id text PRIMARY KEY)' })
  // As in a served app: @hono/node-server puts its lightweight Response in place of the global
  // one when it makes its request listener (serve() does), and the synchronous path knows a
  // finished body by it. Tests that call scopedFetch() in process come before any serve() here.
  getRequestListener(() => new Response(null))
})

afterAll(async () => {
  await d?.close()
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

  it('an app that mounts scopedSession() of the same scope, served by scopedFetch(): one session per request, committed before the response', async () => {
    const app = new Hono()
    const ids: string[] = []
    // Before the middleware: inside scopedFetch's scope only.
    app.use(async (_c, next) => {
      ids.push(getSessionOf(d).id)
      await next()
    })
    app.use(scopedSession(d.scope))
    app.post('/both/:id', async (c) => {
      const id = c.req.param('id')
      ids.push(getSessionOf(d).id)
      await getSessionOf(d).use((client) =>
        client.query('INSERT INTO items (id) VALUES ($1)', [id]),
      )
      return c.text('ok', 201)
    })
    const before = d.scope.stats().totals.acquired
    const s = await serveFetch(scopedFetch(app, d.scope))
    try {
      const res = await fetch(`${s.url}/both/both-mounted`, { method: 'POST' })
      expect(res.status).toBe(201)
      expect(await rowIds(d.url, "SELECT id FROM items WHERE id = 'both-mounted'")).toEqual([
        'both-mounted',
      ])
      await settled(d)
      expect(new Set(ids).size).toBe(1)
      expect(d.scope.stats().totals.acquired - before).toBe(1)
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
