/**
 * Where getSession() works, that requests never share one, that a route
 * without a statement checks nothing out (both entry points, each request
 * followed by its `x-test-id`), and how the middleware is set up.
 */
import { createScope, getSession, type Session, SessionClosedError } from '@scoped/core'
import { pgDriver } from '@scoped/pg'
import { Hono } from 'hono'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { scopedSession } from '../src/index.ts'
import { type Db, database, deferred, entries, type Running, settled, until } from './support.ts'

const CONCURRENT = 12

/** Sessions seen from a plain function the handler calls: no context passed in. */
function sessionIdInHelper(d: Db): string {
  return d.scope.getSession().id
}

describe.each(entries)('$title', (m) => {
  let d: Db
  let server: Running
  const lateWork = deferred<unknown>()

  beforeAll(async () => {
    d = await database(m.db('session'), { max: CONCURRENT + 4 })
    const app = new Hono<{ Variables: { seenByMiddleware: string } }>()
    m.mount(app, d.scope)
    app.use('/mw/*', async (c, next) => {
      c.set('seenByMiddleware', d.scope.getSession().id)
      await next()
    })

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
        n: c.req.param('n'),
        name: session.name,
        ids: [c.get('seenByMiddleware'), session.id, sessionIdInHelper(d), inTimer.id],
        pids: [pid, inTimer.pid],
      })
    })

    app.get('/no-db', (c) => c.text('no statement here'))

    if (m.kind === 'middleware') {
      app.post('/orders', async (c) => c.text(d.scope.getSession().name))
      const api = new Hono()
      api.get('/users/:id', (c) => c.text(d.scope.getSession().name))
      app.route('/api', api)
      app.notFound((c) => c.text(d.scope.getSession().name, 404))
    }

    app.get('/fire-and-forget', async (c) => {
      const session = d.scope.getSession()
      setTimeout(() => {
        session.use((client) => client.query('SELECT 1')).then(lateWork.resolve, lateWork.resolve)
      }, 50)
      return c.text('returned before the timer fired')
    })

    server = await m.listen(app)
  })

  afterAll(async () => {
    await server?.close()
    await d?.close()
  })

  describe('getSession() inside a request', () => {
    it('is the same session in later middleware, the handler, a helper and a timer; concurrent requests never share', async () => {
      const t = m.tally(d.scope.name)
      const results = await Promise.all(
        Array.from({ length: CONCURRENT }, (_, n) =>
          fetch(`${server.url}/mw/who/${n}`, { headers: { 'x-test-id': `who-${n}` } }).then(
            async (r) => {
              expect(r.status).toBe(200)
              return (await r.json()) as { n: string; name: string; ids: string[]; pids: number[] }
            },
          ),
        ),
      )
      await settled(d)
      t.stop()
      for (const r of results) {
        expect(new Set(r.ids).size, `one session per request ${r.n}: ${r.ids}`).toBe(1)
        expect(r.pids[0]).toBe(r.pids[1])
        // scopedFetch's sessions are named after x-test-id here.
        expect(r.name).toBe(m.kind === 'middleware' ? 'GET /mw/who/:n' : `who-${r.n}`)
      }
      // All requests were inside their units of work at once, each on its own session and backend.
      expect(new Set(results.map((r) => r.ids[0])).size).toBe(CONCURRENT)
      expect(new Set(results.map((r) => r.pids[0])).size).toBe(CONCURRENT)
      for (let n = 0; n < CONCURRENT; n++) {
        expect(t.acquiresOf(`who-${n}`)).toBe(1)
        expect(t.releasesOf(`who-${n}`)).toBe(1)
      }
      expect(d.pool.totalCount).toBe(d.pool.idleCount)
    })

    it('a route that runs no statement checks out no connection and makes no session', async () => {
      const before = d.scope.stats().totals.acquired
      for (let i = 0; i < 20; i++) {
        const r = await fetch(`${server.url}/no-db`)
        expect(await r.text()).toBe('no statement here')
      }
      await settled(d)
      expect(d.scope.stats().totals.acquired).toBe(before)
    })

    // scopedFetch's default names are in fetch.test.ts.
    if (m.kind === 'middleware')
      it('names the session after the method and the route pattern', async () => {
        const post = await fetch(`${server.url}/orders`, { method: 'POST' })
        expect(await post.text()).toBe('POST /orders')
        const sub = await fetch(`${server.url}/api/users/7`)
        expect(await sub.text()).toBe('GET /api/users/:id')
        // No route: the middleware's own pattern, never the raw URL (names are labels in stats).
        const none = await fetch(`${server.url}/nowhere/123`)
        expect(none.status).toBe(404)
        expect(await none.text()).toBe('GET /*')
        await settled(d)
      })

    it('work that outlives its request fails loudly instead of using a released connection', async () => {
      const r = await fetch(`${server.url}/fire-and-forget`)
      expect(r.status).toBe(200)
      const late = await lateWork.promise
      expect(late).toBeInstanceOf(SessionClosedError)
      expect((late as Error).message).toContain("'GET /fire-and-forget'")
      await settled(d)
    })
  })

  if (m.kind === 'middleware')
    describe('setting the middleware up', () => {
      it('uses the default scope, looked up when the middleware is made', async () => {
        expect(() => scopedSession()).toThrow(/no default scope.*createScope\(\{ driver \}\)/)

        const pool = new pg.Pool({ connectionString: d.url, max: 2 })
        const scope = createScope({ driver: pgDriver(pool), name: 'hono-default' })
        try {
          const app = new Hono()
          app.use(scopedSession())
          app.get('/', async (c) => {
            // Unregistered default scope: its connection type is unknown to TypeScript.
            const session = getSession() as unknown as Session<pg.PoolClient>
            const { rows } = await session.use((client) => client.query('SELECT 41 + 1 AS n'))
            return c.json({ n: rows[0].n, name: getSession().name })
          })
          const res = await app.request('/')
          expect(await res.json()).toEqual({ n: 42, name: 'GET /' })
          await until(() => scope.stats().open === 0, 'request scope ended')
          expect(pool.totalCount).toBe(pool.idleCount)
        } finally {
          await scope.close()
        }
      })

      it('rejects wrong options with a TypeError that names the option', () => {
        expect(() => scopedSession(d.scope, { cancelOnAbort: 'yes' as never })).toThrow(
          /\{ cancelOnAbort \}\): expected a boolean, got "yes"/,
        )
        expect(() => scopedSession(d.scope, { commitOn: true as never })).toThrow(
          /\{ commitOn \}\): expected a function, got true/,
        )
        expect(() => scopedSession(d.scope, { name: 'GET /x' as never })).toThrow(
          /\{ name \}\): expected a function/,
        )
        expect(() => scopedSession(d.scope, { commitOnn: () => true } as never)).toThrow(
          /\{ commitOnn \}\): unknown option. Known options: name, commitOn, cancelOnAbort/,
        )
        expect(() => scopedSession({ cancelOnAbort: true } as never)).toThrow(
          /expected a Scope.*pass undefined first: scopedSession\(undefined, options\)/,
        )
        expect(() => scopedSession(d.scope, 5 as never)).toThrow(/options must be an object, got 5/)
      })

      it('a custom name(c) names the session; a bad one fails the request with a clear error', async () => {
        const errors: Error[] = []
        const app = new Hono()
        app.onError((err, c) => {
          errors.push(err)
          return c.text('failed', 500)
        })
        app.use(
          '/named/*',
          scopedSession(d.scope, { name: (c) => `api:${c.req.param('what') ?? 'x'}` }),
        )
        app.use('/unnamed/*', scopedSession(d.scope, { name: () => '' }))
        app.get('/named/:what', (c) => c.text(d.scope.getSession().name))
        app.get('/unnamed/:what', (c) => c.text('never'))
        expect(await (await app.request('/named/thing')).text()).toBe('api:x')
        const bad = await app.request('/unnamed/thing')
        expect(bad.status).toBe(500)
        expect(errors[0]?.message).toMatch(
          /\{ name \}\): name\(c\) must return a non-empty string, got ""/,
        )
      })
    })
})
