/**
 * Where getSession() works (everywhere after the middleware, and only there),
 * what the session is called, and what the middleware refuses to be made with.
 */
import type { IncomingMessage } from 'node:http'
import { createScope, getSession, NoActiveScopeError } from '@scoped/core'
import { scopedSession } from '@scoped/express'
import { pgDriver } from '@scoped/pg'
import express, { type NextFunction, type Request, type Response } from 'express'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import { type Db, latch, listen, makeDb, openTransactions, releases, settled } from './support.ts'

let url: string
let d: Db

beforeAll(async () => {
  url = await testDatabase('express_session')
  d = makeDb(url, 'express_session')
})

afterAll(async () => {
  await d.close()
})

/** Errors as JSON, so a test can read what the handler threw. */
function errorsAsJson(err: unknown, _req: Request, res: Response, _next: NextFunction): void {
  const e = err as { name?: string; code?: string; message?: string }
  res.status(500).json({ name: e.name, code: e.code, message: e.message })
}

describe('getSession() inside the request', () => {
  it('is the same session in the handler, a helper, a timer, a verify hook, a middleware after the parser and a req listener', async () => {
    const app = express()
    app.use(scopedSession(d.scope))
    const seen: Record<string, string> = {}
    app.use(
      express.json({
        verify: () => {
          seen.verify = d.scope.getSession().id
        },
      }),
    )
    app.use((_req, _res, next) => {
      seen.afterParser = d.scope.getSession().id
      next()
    })
    // A body reader of its own: its 'end' listener runs in the socket's async context,
    // not the middleware's, unless the request's listeners run inside the scope.
    const readRaw = (req: Request, _res: Response, next: NextFunction) => {
      let size = 0
      req.on('data', (c: Buffer) => {
        size += c.length
      })
      req.on('end', () => {
        seen.reqListener = d.scope.getSession().id
        ;(req as Request & { size?: number }).size = size
        next()
      })
    }
    const helper = () => d.scope.getSession().id
    const handler = async (req: Request, res: Response) => {
      const inHandler = d.scope.getSession().id
      const inTimer = await new Promise<string>((resolve) =>
        setTimeout(() => resolve(d.scope.getSession().id), 5),
      )
      const { rows } = await d.db.query<{ n: number }>('SELECT 1 AS n')
      res.json({
        ...seen,
        inHandler,
        inHelper: helper(),
        inTimer,
        afterQuery: d.scope.getSession().id,
        n: rows[0]!.n,
        size: (req as Request & { size?: number }).size,
      })
    }
    app.post('/json', handler)
    app.post('/raw', readRaw, handler)
    const srv = await listen(app)
    try {
      const json = await fetch(`${srv.url}/json`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ hello: 'world' }),
      })
      expect(json.status).toBe(200)
      const a = (await json.json()) as Record<string, unknown>
      expect(a.n).toBe(1)
      for (const key of ['afterParser', 'inHandler', 'inHelper', 'inTimer', 'afterQuery']) {
        expect(a[key], key).toBe(a.verify)
      }

      for (const k of Object.keys(seen)) delete seen[k]
      const raw = await fetch(`${srv.url}/raw`, {
        method: 'POST',
        headers: { 'content-type': 'application/octet-stream' },
        body: Buffer.alloc(200_000, 1),
      })
      expect(raw.status).toBe(200)
      const b = (await raw.json()) as Record<string, unknown>
      expect(b.size).toBe(200_000)
      expect(typeof b.reqListener).toBe('string')
      for (const key of ['afterParser', 'inHandler', 'inHelper', 'inTimer', 'afterQuery']) {
        expect(b[key], key).toBe(b.reqListener)
      }
      expect(b.inHandler).not.toBe(a.inHandler)
    } finally {
      await srv.close()
    }
    await settled(d)
  })

  it('gives two concurrent requests two sessions that never see each other', async () => {
    const app = express()
    app.use(scopedSession(d.scope))
    const aWaiting = latch()
    const letAGo = latch()
    app.get('/tag/:tag', async (req, res) => {
      const tag = req.params.tag as string
      const first = d.scope.getSession()
      await d.db.query(`SELECT set_config('app.tag', $1, true)`, [tag])
      const { rows: tx } = await d.db.query<{ txid: string }>('SELECT txid_current()::text AS txid')
      if (tag === 'a') {
        aWaiting.resolve()
        await letAGo.promise
      }
      const { rows } = await d.db.query<{ tag: string }>(`SELECT current_setting('app.tag') AS tag`)
      res.json({
        sameSession: first === d.scope.getSession(),
        id: first.id,
        txid: tx[0]!.txid,
        tag: rows[0]!.tag,
      })
    })
    const srv = await listen(app)
    try {
      const a = fetch(`${srv.url}/tag/a`).then((r) => r.json())
      await aWaiting.promise
      const b = (await fetch(`${srv.url}/tag/b`).then((r) => r.json())) as Record<string, unknown>
      letAGo.resolve()
      const ra = (await a) as Record<string, unknown>
      expect(ra).toMatchObject({ sameSession: true, tag: 'a' })
      expect(b).toMatchObject({ sameSession: true, tag: 'b' })
      expect(ra.id).not.toBe(b.id)
      expect(ra.txid).not.toBe(b.txid)
    } finally {
      await srv.close()
    }
    await settled(d)
  })

  it('is an error outside the middleware: before it, and in work left behind after the response', async () => {
    const app = express()
    const outside: string[] = []
    app.use((_req, _res, next) => {
      try {
        d.scope.getSession()
      } catch (e) {
        outside.push((e as Error).name)
      }
      next()
    })
    app.use(scopedSession(d.scope))
    const leftBehind = latch<string>()
    app.get('/', (_req, res) => {
      const session = d.scope.getSession()
      res.send('ok')
      // Fire-and-forget work that outlives the response: its session is closed.
      setTimeout(() => {
        session
          .use((c) => c.query('SELECT 1'))
          .then(
            () => leftBehind.resolve('ran'),
            (e: Error) => leftBehind.resolve(e.name),
          )
      }, 20)
    })
    const srv = await listen(app)
    try {
      expect((await fetch(srv.url)).status).toBe(200)
      expect(outside).toEqual([NoActiveScopeError.name])
      expect(await leftBehind.promise).toBe('SessionClosedError')
    } finally {
      await srv.close()
    }
    await settled(d)
  })
})

describe('a route that never touches the database', () => {
  it('checks out no connection, with or without getSession()', async () => {
    const fresh = makeDb(url, 'express_session_nodb')
    const count = releases(fresh.scope.name)
    const app = express()
    app.use(scopedSession(fresh.scope))
    app.use(express.json())
    app.get('/static', (_req, res) => {
      res.json({ ok: true })
    })
    app.post('/touch', (_req, res) => {
      const s = fresh.scope.getSession()
      res.json({ state: s.state })
    })
    app.get('/boom', () => {
      throw new Error('no database here')
    })
    const srv = await listen(app)
    try {
      for (let i = 0; i < 20; i++) {
        expect((await fetch(`${srv.url}/static`)).status).toBe(200)
        const touch = await fetch(`${srv.url}/touch`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: '{"a":1}',
        })
        expect(await touch.json()).toEqual({ state: 'idle' })
        expect((await fetch(`${srv.url}/boom`)).status).toBe(500)
        expect((await fetch(`${srv.url}/missing`)).status).toBe(404)
      }
      await settled(fresh)
      expect(fresh.scope.stats().totals.acquired).toBe(0)
      expect(fresh.pool.totalCount).toBe(0)
      expect(count.count).toBe(0)
    } finally {
      count.stop()
      await srv.close()
      await fresh.close()
    }
  })
})

describe('the session name', () => {
  it('is METHOD and the route pattern, with the mount path; before routing it is provisional', async () => {
    const app = express()
    app.use(scopedSession(d.scope))
    const names: Record<string, string> = {}
    app.use(
      express.json({
        verify: (req: IncomingMessage) => {
          // Made before routing: the session keeps the provisional name.
          if ((req as Request).path === '/early') names.early = d.scope.getSession().name
        },
      }),
    )
    app.get('/orders/:id', async (_req, res) => {
      await d.db.query('SELECT 1')
      res.json({ name: d.scope.getSession().name })
    })
    app.post('/early', (_req, res) => {
      res.json({ name: d.scope.getSession().name })
    })
    const api = express.Router()
    api.get('/items/:itemId', (_req, res) => {
      res.json({ name: d.scope.getSession().name })
    })
    api.get('/', (_req, res) => {
      res.json({ name: d.scope.getSession().name })
    })
    app.use('/api', api)
    const srv = await listen(app)
    try {
      const name = async (path: string, init?: RequestInit) =>
        ((await (await fetch(`${srv.url}${path}`, init)).json()) as { name: string }).name
      expect(await name('/orders/42')).toBe('GET /orders/:id')
      expect(await name('/api/items/7')).toBe('GET /api/items/:itemId')
      expect(await name('/api')).toBe('GET /api')
      expect(
        await name('/early', {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: '{}',
        }),
      ).toBe('POST /*')
      expect(names.early).toBe('POST /*')
    } finally {
      await srv.close()
    }
    await settled(d)
  })

  it("carries req.id as its requestId: set on the request (pino-http) or by a getter on the app's request prototype", async () => {
    const app = express()
    app.use((req, _res, next) => {
      if (req.path === '/own') (req as { id?: unknown }).id = 'own-7'
      next()
    })
    app.use(scopedSession(d.scope))
    app.get('/:kind', (_req, res) => {
      res.json({ requestId: d.scope.getSession().requestId ?? null })
    })
    const inherited = express()
    Object.defineProperty(inherited.request, 'id', { get: () => 42, configurable: true })
    inherited.use(scopedSession(d.scope))
    inherited.get('/', (_req, res) => {
      res.json({ requestId: d.scope.getSession().requestId ?? null })
    })
    const srv = await listen(app)
    const srv2 = await listen(inherited)
    try {
      const id = async (url: string) =>
        ((await (await fetch(url)).json()) as { requestId: string | null }).requestId
      expect(await id(`${srv.url}/own`)).toBe('own-7')
      expect(await id(`${srv.url}/none`)).toBe(null)
      expect(await id(srv2.url)).toBe('42')
    } finally {
      await srv.close()
      await srv2.close()
    }
    await settled(d)
  })

  it('comes from name(req) when given; a bad result is reported as a TypeError naming the option', async () => {
    const reported: { during: string; error: unknown }[] = []
    const own = makeDb(url, 'express_session_names', {
      onError: (error, { during }) => reported.push({ during, error }),
    })
    const app = express()
    app.get('/bad', scopedSession(own.scope, { name: () => '' }), async (_req, res) => {
      await own.db.query('SELECT 1')
      res.json({ name: own.scope.getSession().name })
    })
    app.use(
      scopedSession(own.scope, { name: (req) => `tenant-a ${req.method} ${req.route?.path}` }),
    )
    app.get('/custom/:id', (_req, res) => {
      res.json({ name: own.scope.getSession().name })
    })
    const srv = await listen(app)
    try {
      expect(await (await fetch(`${srv.url}/custom/1`)).json()).toEqual({
        name: 'tenant-a GET /custom/:id',
      })
      expect(reported).toEqual([])
      // The request goes on under the default name; the mistake is reported, once.
      const bad = await fetch(`${srv.url}/bad`)
      expect(bad.status).toBe(200)
      expect(await bad.json()).toEqual({ name: 'GET /bad' })
      expect(reported).toHaveLength(1)
      expect(reported[0]!.during).toBe('scopedSession({ name })')
      expect(reported[0]!.error).toBeInstanceOf(TypeError)
      expect((reported[0]!.error as Error).message).toBe(
        'scopedSession(scope, { name }): name(req) must return a non-empty string, got ""; the default name is used instead',
      )
      await settled(own)
    } finally {
      await srv.close()
      await own.close()
    }
  })
})

describe('mounting', () => {
  it('mounted twice for one scope (app and router) opens one session', async () => {
    const count = releases(d.scope.name)
    const app = express()
    app.use(scopedSession(d.scope))
    let outer = ''
    app.use((_req, _res, next) => {
      outer = d.scope.getSession().id
      next()
    })
    const router = express.Router()
    router.use(scopedSession(d.scope))
    router.get('/', async (_req, res) => {
      await d.db.query('SELECT 1')
      res.json({ same: d.scope.getSession().id === outer })
    })
    app.use('/r', router)
    const srv = await listen(app)
    try {
      expect(await (await fetch(`${srv.url}/r`)).json()).toEqual({ same: true })
      await settled(d)
      expect(count.count).toBe(1)
    } finally {
      count.stop()
      await srv.close()
    }
  })

  it('two scopes mounted together each give the request its own session, both committed', async () => {
    const other = makeDb(url, 'express_session_other')
    await independentQuery(url, 'CREATE TABLE IF NOT EXISTS two (db text, id text)')
    const app = express()
    app.use(scopedSession(d.scope))
    app.use(scopedSession(other.scope))
    app.post('/two/:id', async (req, res) => {
      await d.db.query(`INSERT INTO two VALUES ('main', $1)`, [req.params.id])
      await other.db.query(`INSERT INTO two VALUES ('other', $1)`, [req.params.id])
      res.json({ distinct: d.scope.getSession().id !== other.scope.getSession().id })
    })
    const srv = await listen(app)
    try {
      expect(await (await fetch(`${srv.url}/two/t1`, { method: 'POST' })).json()).toEqual({
        distinct: true,
      })
      const rows = await independentQuery(url, `SELECT db FROM two WHERE id = 't1' ORDER BY db`)
      expect(rows).toEqual([{ db: 'main' }, { db: 'other' }])
      await settled(d)
      await settled(other)
    } finally {
      await srv.close()
      await other.close()
    }
  })

  it('a closed scope answers 500 with ScopeClosedError through the error handler', async () => {
    const closed = makeDb(url, 'express_session_closed')
    await closed.close()
    const app = express()
    app.use(scopedSession(closed.scope))
    app.get('/', (_req, res) => {
      res.send('never')
    })
    app.use(errorsAsJson)
    const srv = await listen(app)
    try {
      const res = await fetch(srv.url)
      expect(res.status).toBe(500)
      expect(await res.json()).toMatchObject({ code: 'SCOPE_CLOSED' })
    } finally {
      await srv.close()
    }
  })

  it('uses the default scope when none is given, and says so when there is none', async () => {
    expect(() => scopedSession()).toThrow(/there is no default scope/)
    const pool = new pg.Pool({ connectionString: url, max: 2 })
    const scope = createScope({ driver: pgDriver(pool), name: 'express_default' })
    try {
      const app = express()
      app.use(scopedSession())
      app.get('/', async (_req, res) => {
        const { rows } = await getSession().use((c) => (c as pg.PoolClient).query('SELECT 2 AS n'))
        res.json({ n: rows[0].n, name: getSession().name })
      })
      const srv = await listen(app)
      try {
        expect(await (await fetch(srv.url)).json()).toEqual({ n: 2, name: 'GET /' })
      } finally {
        await srv.close()
      }
    } finally {
      await scope.close()
    }
    expect(pool.totalCount).toBe(0)
    expect(await openTransactions(url, d)).toEqual([])
  })
})

describe('hooks on req and res', () => {
  it('leave apps and routes without the middleware alone: listeners, ends and errors as usual', async () => {
    const plain = express()
    const heard: string[] = []
    plain.post('/echo', (req, res) => {
      let body = ''
      req.setEncoding('utf8')
      req.on('data', (c: string) => {
        body += c
      })
      req.on('end', () => {
        res.on('finish', () => heard.push('finish'))
        res.json({ body })
      })
    })
    const app = express()
    app.get('/before', (_req, res) => {
      res.on('close', () => heard.push('close before'))
      res.send('before')
    })
    app.use(scopedSession(d.scope))
    app.get('/after', (_req, res) => {
      res.send(d.scope.hasSession() ? 'in scope' : 'outside')
    })
    const a = await listen(plain)
    const b = await listen(app)
    try {
      const echo = await fetch(`${a.url}/echo`, { method: 'POST', body: 'hello' })
      expect(await echo.json()).toEqual({ body: 'hello' })
      expect(await (await fetch(`${b.url}/before`)).text()).toBe('before')
      expect(await (await fetch(`${b.url}/after`)).text()).toBe('in scope')
      await vi.waitFor(() => expect(heard.sort()).toEqual(['close before', 'finish']))
    } finally {
      await a.close()
      await b.close()
    }
    await settled(d)
  })

  it('a middleware before it that wraps res.end and res.write (as compression does) still gets the end after the COMMIT', async () => {
    await independentQuery(url, 'CREATE TABLE IF NOT EXISTS wrapped (id text PRIMARY KEY)')
    const app = express()
    const calls: string[] = []
    app.use((_req, res, next) => {
      const end = res.end
      const write = res.write
      res.write = function (this: Response, ...args: unknown[]) {
        calls.push('write')
        return (write as (...a: unknown[]) => boolean).apply(this, args)
      } as Response['write']
      res.end = function (this: Response, ...args: unknown[]) {
        calls.push('end')
        return (end as (...a: unknown[]) => Response).apply(this, args)
      } as Response['end']
      next()
    })
    app.use(scopedSession(d.scope))
    app.post('/wrapped/:id', async (req, res) => {
      await d.db.query('INSERT INTO wrapped (id) VALUES ($1)', [req.params.id])
      res.write('a')
      res.end('b')
    })
    const srv = await listen(app)
    try {
      const res = await fetch(`${srv.url}/wrapped/w1`, { method: 'POST' })
      expect(await res.text()).toBe('ab')
      // Committed by the time the client has the whole body.
      expect(await independentQuery(url, `SELECT id FROM wrapped WHERE id = 'w1'`)).toEqual([
        { id: 'w1' },
      ])
      expect(calls).toEqual(['write', 'end'])
    } finally {
      await srv.close()
    }
    await settled(d)
  })
})

describe('options', () => {
  it('are checked when the middleware is made, with a TypeError naming the option', () => {
    const make =
      (...args: unknown[]) =>
      () =>
        (scopedSession as (...a: unknown[]) => unknown)(...args)
    expect(make(d.scope, { nme: () => 'x' })).toThrow(
      /scopedSession\(scope, \{ nme \}\): unknown option\. Known options: name, commitOn, cancelOnAbort/,
    )
    expect(make(d.scope, { name: 'orders' })).toThrow(/\{ name \}\): expected a function/)
    expect(make(d.scope, { commitOn: true })).toThrow(/\{ commitOn \}\): expected a function/)
    expect(make(d.scope, { cancelOnAbort: 'yes' })).toThrow(
      /\{ cancelOnAbort \}\): expected a boolean, got "yes"/,
    )
    expect(make(d.scope, 5)).toThrow(/options must be an object, got 5/)
    expect(make({ commitOn: () => true })).toThrow(
      /pass undefined first: scopedSession\(undefined, options\)/,
    )
    expect(make('main')).toThrow(/expected a Scope from createScope\(\), got "main"/)
  })
})
