/**
 * Session 5 review probes (adversarial): real servers on 127.0.0.1, real
 * sockets, real PostgreSQL. A test marked `it.fails` asserts the correct
 * behaviour of a bug the review found (its `// BUG:` line says what happens
 * and what should); the others are regression tests of guarantees that hold.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import http from 'node:http'
import net from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { SessionClosedError } from '@scoped/core'
import { scopedSession } from '@scoped/express'
import express, { type NextFunction, type Request, type Response } from 'express'
import pg from 'pg'
import { afterAll, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import { type Db, latch, listen, makeDb, openTransactions, releases, settled } from './support.ts'

let url: string
let d: Db
let observer: pg.Client
let reported: { during: string; error: unknown }[] = []
let dir: string
let file: string
const fileBody = 'z'.repeat(200_000)

beforeAll(async () => {
  url = await testDatabase('express_review_s5')
  await independentQuery(
    url,
    `CREATE TABLE items (id text PRIMARY KEY);
     CREATE TABLE parent (id int PRIMARY KEY);
     CREATE TABLE child (id text PRIMARY KEY,
       parent_id int REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);`,
  )
  d = makeDb(url, 'express_review_s5', {
    onError: (error, { during }) => reported.push({ during, error }),
  })
  observer = new pg.Client({ connectionString: url })
  await observer.connect()
  dir = await mkdtemp(join(tmpdir(), 'scoped-express-s5-'))
  file = join(dir, 'report.txt')
  await writeFile(file, fileBody)
})

afterAll(async () => {
  await observer.end()
  await d.close()
  await rm(dir, { recursive: true, force: true })
})

beforeEach(() => {
  reported = []
})

async function exists(table: 'items' | 'child', id: string): Promise<boolean> {
  const { rows } = await observer.query(`SELECT 1 FROM ${table} WHERE id = $1`, [id])
  return rows.length === 1
}

const insert = (id: string) => d.db.query('INSERT INTO items (id) VALUES ($1)', [id])
/** Succeeds now, fails at COMMIT: the parent does not exist and the check is deferred. */
const insertOrphan = (id: string) =>
  d.db.query('INSERT INTO child (id, parent_id) VALUES ($1, 999)', [id])

/** The SQLSTATE of a statement's failure, the error's name, or 'completed'. */
async function outcome(p: Promise<unknown>): Promise<string> {
  try {
    await p
    return 'completed'
  } catch (e) {
    const code = (e as { code?: unknown }).code
    return typeof code === 'string' && /^[0-9A-Z]{5}$/.test(code) ? code : (e as Error).name
  }
}

interface Raw {
  status: number | undefined
  headers: http.IncomingHttpHeaders
  body: string
  ended: 'complete' | 'error'
  /** Was the row visible from another connection when the status line arrived? */
  visible?: boolean
}

function raw(
  port: number,
  path: string,
  opts: { method?: string; check?: () => Promise<boolean> } = {},
): Promise<Raw> {
  return new Promise((resolve) => {
    let result: Raw = { status: undefined, headers: {}, body: '', ended: 'error' }
    let done = false
    let checking: Promise<void> = Promise.resolve()
    const finish = (ended: Raw['ended']) => {
      if (done) return
      done = true
      void checking.then(() => resolve({ ...result, ended }))
    }
    const req = http.request({
      host: '127.0.0.1',
      port,
      path,
      method: opts.method ?? 'GET',
      agent: false,
    })
    req.on('response', (res) => {
      result = { status: res.statusCode, headers: res.headers, body: '', ended: 'error' }
      if (opts.check) {
        res.pause()
        checking = opts.check().then((v) => {
          result.visible = v
          res.resume()
        })
      }
      res.setEncoding('latin1')
      res.on('data', (c: string) => {
        result.body += c
      })
      res.on('end', () => finish(res.complete ? 'complete' : 'error'))
      res.on('error', () => finish('error'))
      res.on('aborted', () => finish('error'))
    })
    req.on('error', () => finish('error'))
    req.end()
  })
}

async function serve(
  setup: (app: express.Express) => void,
  options: { cancelOnAbort?: boolean } = {},
) {
  const app = express()
  app.use(scopedSession(d.scope, options))
  setup(app)
  return listen(app)
}

describe('responses with a failed COMMIT', () => {
  it('res.redirect(): a 500 without the Location of work that was not saved; a committed one is visible at the 302', async () => {
    const srv = await serve((app) => {
      app.post('/orders/:id', async (req, res) => {
        const id = req.params.id as string
        if (id.startsWith('bad')) await insertOrphan(id)
        else await insert(id)
        res.redirect(303, `/orders/${id}/done`)
      })
    })
    try {
      const bad = await raw(srv.port, '/orders/bad-rd', { method: 'POST' })
      expect(bad.status).toBe(500)
      expect(bad.headers.location).toBeUndefined()
      expect(bad.ended).toBe('complete')
      const ok = await raw(srv.port, '/orders/ok-rd', {
        method: 'POST',
        check: () => exists('items', 'ok-rd'),
      })
      expect(ok).toMatchObject({ status: 303, visible: true, ended: 'complete' })
      expect(ok.headers.location).toBe('/orders/ok-rd/done')
    } finally {
      await srv.close()
    }
    await settled(d)
    expect(await exists('child', 'bad-rd')).toBe(false)
    expect(await openTransactions(url, d)).toEqual([])
  })

  for (const how of ['sendFile', 'download'] as const) {
    it(`res.${how}() of a 200 KB file whose COMMIT fails: never a clean 200, nothing stored, one release`, async () => {
      const count = releases(d.scope.name)
      const srv = await serve((app) => {
        app.get('/file/:id', async (req, res, next) => {
          await insertOrphan(req.params.id as string)
          if (how === 'sendFile') res.sendFile(file, (err) => err && next(err))
          else res.download(file, 'report.txt', (err) => err && next(err))
        })
      })
      try {
        const r = await raw(srv.port, `/file/${how}-bad`)
        expect({ status: r.status, ended: r.ended }).not.toEqual({ status: 200, ended: 'complete' })
        if (r.status === 500) expect(r.headers['content-disposition']).toBeUndefined()
        await settled(d)
        expect(count.count).toBe(1)
        expect(await exists('child', `${how}-bad`)).toBe(false)
        expect(reported.map((x) => x.during)).toEqual([
          expect.stringMatching(/^COMMIT of 'GET \/file\/:id'/),
        ])
      } finally {
        count.stop()
        await srv.close()
      }
    })
  }

  it('res.download() that commits: the row is visible when the client has the status, the whole file arrives', async () => {
    const srv = await serve((app) => {
      app.get('/file/:id', async (req, res, next) => {
        await insert(req.params.id as string)
        res.download(file, 'report.txt', (err) => err && next(err))
      })
    })
    try {
      const r = await raw(srv.port, '/file/dl-ok', { check: () => exists('items', 'dl-ok') })
      // The status line may go out before the COMMIT (the body is a stream); its end may not.
      expect(r.status).toBe(200)
      expect(r.ended).toBe('complete')
      expect(r.body.length).toBe(fileBody.length)
      expect(r.headers['content-disposition']).toMatch(/report\.txt/)
    } finally {
      await srv.close()
    }
    await settled(d)
    expect(await exists('items', 'dl-ok')).toBe(true)
  })

  it('res.json() on HEAD: a committed 200 with no body; a failed COMMIT says 500 in the head, nothing stored', async () => {
    const srv = await serve((app) => {
      app.get('/thing/:id', async (req, res) => {
        const id = req.params.id as string
        if (id.startsWith('bad')) await insertOrphan(id)
        else await insert(id)
        res.json({ id, padding: 'p'.repeat(1000) })
      })
    })
    try {
      const ok = await raw(srv.port, '/thing/head-ok', {
        method: 'HEAD',
        check: () => exists('items', 'head-ok'),
      })
      expect(ok).toMatchObject({ status: 200, body: '', visible: true, ended: 'complete' })
      const bad = await raw(srv.port, '/thing/bad-head', { method: 'HEAD' })
      expect(bad).toMatchObject({ status: 500, body: '', ended: 'complete' })
    } finally {
      await srv.close()
    }
    await settled(d)
    expect(await exists('child', 'bad-head')).toBe(false)
  })
})

describe('what the handler does with its session', () => {
  it('getSession().commit() then throw: the committed part stays, the rest rolls back, a 500, one release', async () => {
    const count = releases(d.scope.name)
    const srv = await serve((app) => {
      app.post('/ct/:id', async (req) => {
        const id = req.params.id as string
        await insert(id)
        await d.scope.getSession().commit()
        await insert(`${id}-after`)
        throw new Error('failed after an explicit commit')
      })
    })
    try {
      const r = await raw(srv.port, '/ct/ct-1', { method: 'POST' })
      expect(r.status).toBe(500)
      await settled(d)
      expect(count.count).toBe(1)
      expect(await exists('items', 'ct-1')).toBe(true)
      expect(await exists('items', 'ct-1-after')).toBe(false)
    } finally {
      count.stop()
      await srv.close()
    }
  })

  it('fire-and-forget use() after the response: SessionClosedError naming the session, nothing checked out', async () => {
    const late = latch<unknown>()
    const srv = await serve((app) => {
      app.post('/ff/:id', async (req, res) => {
        await insert(req.params.id as string)
        setTimeout(() => {
          d.scope
            .getSession()
            .use((c) => c.query('SELECT 1'))
            .then(late.resolve, late.resolve)
        }, 100)
        res.status(201).json({ ok: true })
      })
    })
    try {
      const r = await raw(srv.port, '/ff/ff-1', { method: 'POST' })
      expect(r.status).toBe(201)
      const error = await late.promise
      expect(error).toBeInstanceOf(SessionClosedError)
      expect((error as Error).message).toContain('POST /ff/:id')
    } finally {
      await srv.close()
    }
    await settled(d)
    expect(await exists('items', 'ff-1')).toBe(true)
  })
})

describe('timeouts and aborts with cancelOnAbort', () => {
  it('server.timeout (a socket timeout) during pg_sleep: the statement is cancelled, rollback, one release', async () => {
    const slept = latch<string>()
    const count = releases(d.scope.name)
    const app = express()
    app.use(scopedSession(d.scope, { cancelOnAbort: true }))
    app.get('/sleep/:id', async (req, res) => {
      await insert(req.params.id as string)
      slept.resolve(await outcome(d.db.query('SELECT pg_sleep(20)')))
      res.json({ ok: true })
    })
    const server = http.createServer(app)
    server.timeout = 200
    const srv = await listen(app, server)
    try {
      const r = await raw(srv.port, '/sleep/st-1')
      expect(r.ended).toBe('error')
      expect(await slept.promise).toBe('57014')
      await settled(d)
      expect(count.count).toBe(1)
      expect(await exists('items', 'st-1')).toBe(false)
    } finally {
      count.stop()
      await srv.close()
    }
  })

  // BUG: a pipelined request whose client left while it waited for the socket is not aborted, so cancelOnAbort does not cancel its running pg_sleep (it runs to its end on a connection nobody will answer); it should be cancelled (57014) like the first request's.
  // (request-unit.ts sees the abort only through res 'close' (#onClose) and checks the socket only in resEnd (#gone); Node emits no 'close' on a queued pipelined ServerResponse, only on its IncomingMessage.)
  it('two pipelined requests whose client leaves: the second one’s pg_sleep is cancelled too', async () => {
    const slept = { first: latch<string>(), second: latch<string>() }
    const started = { first: latch(), second: latch() }
    const srv = await serve(
      (app) => {
        app.get('/s/:id', async (req, res) => {
          const id = req.params.id as string
          await insert(id)
          const which = id === 'pc-1' ? 'first' : 'second'
          started[which].resolve()
          slept[which].resolve(await outcome(d.db.query('SELECT pg_sleep(5)')))
          res.json({ id })
        })
      },
      { cancelOnAbort: true },
    )
    const socket = net.connect(srv.port, '127.0.0.1')
    socket.on('error', () => {})
    const get = (p: string) => `GET ${p} HTTP/1.1\r\nHost: x\r\n\r\n`
    socket.write(get('/s/pc-1') + get('/s/pc-2'))
    try {
      await Promise.all([started.first.promise, started.second.promise])
      await vi.waitFor(
        async () => {
          const { rows } = await observer.query(
            "SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = $1 AND state = 'active' AND query LIKE '%pg_sleep%'",
            [d.appName],
          )
          expect(rows[0].n).toBe(2)
        },
        { timeout: 5_000, interval: 10 },
      )
      socket.destroy()
      try {
        expect(await slept.first.promise).toBe('57014')
        const second = await Promise.race([
          slept.second.promise,
          new Promise<string>((r) =>
            setTimeout(() => r('still sleeping 2.5 s after the client left'), 2500),
          ),
        ])
        expect(second).toBe('57014')
      } finally {
        await slept.second.promise
        await settled(d)
      }
      expect(await exists('items', 'pc-1')).toBe(false)
      expect(await exists('items', 'pc-2')).toBe(false)
    } finally {
      await srv.close()
    }
  })
})

describe('mounting', () => {
  it('scopedSession() on the app and again on a sub-app mounted under it: one session, committed once', async () => {
    const count = releases(d.scope.name)
    const sub = express()
    sub.use(scopedSession(d.scope))
    const seen: string[] = []
    sub.post('/x/:id', async (req: Request, res: Response, _next: NextFunction) => {
      const id = req.params.id as string
      await insert(id)
      seen.push(d.scope.getSession().id)
      res.status(201).json({ ok: true })
    })
    const app = express()
    app.use(scopedSession(d.scope))
    app.use((_req, _res, next) => {
      seen.push(d.scope.getSession().id)
      next()
    })
    app.use('/sub', sub)
    const srv = await listen(app)
    try {
      const r = await raw(srv.port, '/sub/x/sub-1', {
        method: 'POST',
        check: () => exists('items', 'sub-1'),
      })
      expect(r).toMatchObject({ status: 201, visible: true })
      expect(new Set(seen).size).toBe(1)
      await settled(d)
      expect(count.count).toBe(1)
    } finally {
      count.stop()
      await srv.close()
    }
  })
})
