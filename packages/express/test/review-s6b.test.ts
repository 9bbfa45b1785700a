/**
 * Session 6 review, round b: probes of this session's two Express changes, over
 * real servers on 127.0.0.1 and a real PostgreSQL.
 *
 * - The gate's freeze/thaw: a response held for its COMMIT goes out with the
 *   status and headers it had at its `res.end()`, whatever rewrote them while
 *   it waited (res.headersSent is false meanwhile).
 * - The aborted unit's 500: a unit aborted by a socket timeout whose request
 *   goes on and answers what commitOn would commit gets 500 instead.
 *
 * A test marked `it.fails` asserts what was expected where the library does
 * otherwise (its comment says what happens); the others are regression tests.
 */
import http from 'node:http'
import net from 'node:net'
import { createScope } from '@scoped/core'
import { scopedSession } from '@scoped/express'
import { pgDriver, scopedPool } from '@scoped/pg'
import express, { type NextFunction, type Request, type Response } from 'express'
import pg from 'pg'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import { type Db, listen, makeDb, rawRequest, releases, settled } from './support.ts'

let url: string
let d: Db
/** The same, over a scope in transaction: 'none' (autocommit statements). */
let none: Db
let observer: pg.Client
let reported: { during: string; error: unknown }[] = []

beforeAll(async () => {
  url = await testDatabase('express_review_s6b')
  await independentQuery(
    url,
    `CREATE TABLE items (id text PRIMARY KEY);
     CREATE TABLE uniq (k text, CONSTRAINT uniq_k UNIQUE (k) DEFERRABLE INITIALLY DEFERRED);`,
  )
  d = makeDb(url, 'express_review_s6b', {
    onError: (error, { during }) => reported.push({ during, error }),
  })
  const appName = 'scoped_express_review_s6b_none'
  const pool = new pg.Pool({ connectionString: url, max: 4, application_name: appName })
  const scope = createScope({
    driver: pgDriver(pool),
    name: 'express_review_s6b_none',
    default: false,
    transaction: 'none',
    leakDetectionMs: 0,
    onError: (error, { during }) => reported.push({ during, error }),
  })
  none = { scope, pool, db: scopedPool(scope), appName, close: () => scope.close() }
  observer = new pg.Client({ connectionString: url })
  await observer.connect()
})

afterAll(async () => {
  await observer.end()
  await d.close()
  await none.close()
})

beforeEach(() => {
  reported = []
})

async function exists(id: string): Promise<boolean> {
  const { rows } = await observer.query('SELECT 1 FROM items WHERE id = $1', [id])
  return rows.length === 1
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

async function serve(
  setup: (app: express.Express) => void,
  options: Parameters<typeof scopedSession>[1] = {},
  db: Db = d,
) {
  const app = express()
  app.use(scopedSession(db.scope, options))
  setup(app)
  return listen(app)
}

interface Answer {
  status: number | undefined
  headers: http.IncomingHttpHeaders
  body: string
  ended: 'complete' | 'error'
}

/** One request on a fresh socket: status, headers, body, and whether it ended cleanly. */
function request(
  base: string,
  path: string,
  opts: { method?: string; headers?: Record<string, string> } = {},
): Promise<Answer> {
  return new Promise((resolve) => {
    let done = false
    const finish = (a: Answer) => {
      if (done) return
      done = true
      resolve(a)
    }
    const req = http.request(`${base}${path}`, {
      method: opts.method ?? 'GET',
      agent: false,
      headers: opts.headers,
    })
    req.on('response', (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c: string) => {
        body += c
      })
      const a = (ended: Answer['ended']) => ({
        status: res.statusCode,
        headers: res.headers,
        body,
        ended,
      })
      res.on('end', () => finish(a(res.complete ? 'complete' : 'error')))
      res.on('aborted', () => finish(a('error')))
      res.on('error', () => finish(a('error')))
    })
    req.on('error', () => finish({ status: undefined, headers: {}, body: '', ended: 'error' }))
    req.end()
  })
}

describe('a held response goes out as it was ended (freeze/thaw)', () => {
  // README: "The held response goes out as it was ended, with the status and headers it had at
  // its res.end(); the later answer is ignored". Express's final handler (next() after
  // res.json()) rewrites status, Content-Type, Content-Length, CSP while the end waits.
  it('two Set-Cookie values, a custom header and its status survive a next() after res.json(); committed, one release', async () => {
    const srv = await serve((app) => {
      app.post('/cookies/:id', async (req, res, next) => {
        await d.db.query('INSERT INTO items (id) VALUES ($1)', [req.params.id])
        res.cookie('a', '1')
        res.cookie('b', '2')
        res.setHeader('X-Custom', ['x', 'y'])
        res.status(201).json({ ok: true })
        next()
      })
    })
    const count = releases(d.scope.name)
    try {
      const r = await request(srv.url, '/cookies/th-1', { method: 'POST' })
      await settled(d)
      expect(count.count).toBe(1)
      expect({
        status: r.status,
        cookies: r.headers['set-cookie'],
        custom: r.headers['x-custom'],
        type: r.headers['content-type'],
        csp: r.headers['content-security-policy'],
        body: r.body,
        ended: r.ended,
      }).toEqual({
        status: 201,
        cookies: ['a=1; Path=/', 'b=2; Path=/'],
        custom: 'x, y',
        type: 'application/json; charset=utf-8',
        csp: undefined,
        body: '{"ok":true}',
        ended: 'complete',
      })
      expect(await exists('th-1')).toBe(true)
    } finally {
      count.stop()
      await srv.close()
    }
  })

  it('a 303 redirect, then a throw in the same turn: the client gets the 303 and its Location; committed (the first end decided)', async () => {
    const srv = await serve((app) => {
      app.post('/redirect/:id', async (req, res) => {
        await d.db.query('INSERT INTO items (id) VALUES ($1)', [req.params.id])
        res.redirect(303, `/items/${req.params.id}`)
        throw new Error('after the redirect')
      })
      app.use((_err: unknown, _req: Request, res: Response, _next: NextFunction) => {
        if (!res.headersSent) res.status(500).send('error handler')
      })
    })
    try {
      const r = await request(srv.url, '/redirect/th-2', { method: 'POST' })
      await settled(d)
      // The first res.end() decided (nothing was thrown yet): committed, and the held 303 is
      // not rewritten to the error handler's 500 — answer and work agree.
      const saved = await exists('th-2')
      expect({ status: r.status, location: r.headers.location, saved }).toEqual({
        status: 303,
        location: '/items/th-2',
        saved: true,
      })
    } finally {
      await srv.close()
    }
  })

  it('HEAD, then next() in the same turn: the 200 goes out with its Content-Length and no body; committed', async () => {
    const srv = await serve((app) => {
      app.head('/head/:id', async (req, res, next) => {
        await d.db.query('INSERT INTO items (id) VALUES ($1)', [req.params.id])
        res.setHeader('Content-Length', '42')
        res.status(200).end()
        next()
      })
    })
    try {
      const r = await request(srv.url, '/head/th-3', { method: 'HEAD' })
      await settled(d)
      expect({ status: r.status, length: r.headers['content-length'], body: r.body }).toEqual({
        status: 200,
        length: '42',
        body: '',
      })
      expect(await exists('th-3')).toBe(true)
    } finally {
      await srv.close()
    }
  })

  it('a 204, then next() in the same turn: a 204 with no body and no Content-Type; committed', async () => {
    const srv = await serve((app) => {
      app.delete('/gone/:id', async (req, res, next) => {
        await d.db.query('INSERT INTO items (id) VALUES ($1)', [req.params.id])
        res.status(204).end()
        next()
      })
    })
    try {
      const r = await request(srv.url, '/gone/th-4', { method: 'DELETE' })
      await settled(d)
      expect({ status: r.status, type: r.headers['content-type'], body: r.body }).toEqual({
        status: 204,
        type: undefined,
        body: '',
      })
      expect(await exists('th-4')).toBe(true)
    } finally {
      await srv.close()
    }
  })

  // README (Aborts / the held end): "a timeout callback's if (!res.headersSent)
  // res.status(503).send(...)" is ignored. The same callback written with Node's own
  // res.writeHead() (no Express helper): writeHead() generates the header block at once, so
  // res.headersSent turns true and the gate's thaw (which skips a response whose headers are
  // generated) leaves the 503 in place. Expected: as with res.status(503).send(), the client's
  // answer and the saved work agree (the 201 'saved', or a 503 with nothing saved).
  // What happened (fixed in session 6): the COMMIT succeeds (saved), and the client gets status 503 with the held
  // body 'saved', a clean end — a 503 for committed work.
  it('a timeout callback that answers with res.writeHead(503) during a blocked COMMIT: the client’s answer and the saved work agree', async () => {
    const blocker = new pg.Client({ connectionString: url })
    await blocker.connect()
    await blocker.query('BEGIN')
    await blocker.query(`INSERT INTO uniq (k) VALUES ('wh-1')`)
    const srv = await serve((app) => {
      app.post('/blocked', async (_req, res) => {
        res.setTimeout(150, () => {
          if (!res.headersSent) {
            res.writeHead(503, { 'Content-Type': 'text/plain' })
            res.end('timed out')
          }
        })
        await d.db.query(`INSERT INTO uniq (k) VALUES ('wh-1')`)
        res.status(201).send('saved')
      })
    })
    const count = releases(d.scope.name)
    try {
      const pending = request(srv.url, '/blocked', { method: 'POST' })
      await sleep(400) // the COMMIT blocks on the uncommitted duplicate; the timeout fires
      await blocker.query('ROLLBACK') // the COMMIT can now succeed
      const r = await pending
      await settled(d)
      expect(count.count).toBe(1)
      const saved = (await observer.query(`SELECT 1 FROM uniq WHERE k = 'wh-1'`)).rows.length === 1
      expect({ status: r.status, body: r.body, ended: r.ended, saved }).toEqual(
        saved
          ? { status: 201, body: 'saved', ended: 'complete', saved: true }
          : { status: 503, body: 'timed out', ended: 'complete', saved: false },
      )
    } finally {
      count.stop()
      await blocker.end()
      await srv.close()
    }
  })
})

describe('a timed-out unit whose request goes on (the aborted 500)', () => {
  // README (Aborts): "If that request then answers as if it succeeded (...) and it had a
  // session, the client gets 500 instead (or a cut connection, if the response had begun)".
  it('the response had begun (res.write) before the timeout: the connection is cut, nothing saved, one release', async () => {
    const srv = await serve((app) => {
      app.post('/stream/:id', async (req, res) => {
        res.setTimeout(100, () => {
          /* log only: the request goes on */
        })
        res.write('first chunk\n')
        await d.db.query('INSERT INTO items (id) VALUES ($1)', [req.params.id])
        await sleep(300)
        res.end('last chunk\n')
      })
    })
    const count = releases(d.scope.name)
    try {
      const r = await rawRequest(srv.url, '/stream/ab-1', { method: 'POST' })
      await settled(d)
      expect(count.count).toBe(1)
      expect({ status: r.status, ended: r.ended, saved: await exists('ab-1') }).toEqual({
        status: 200,
        ended: 'error',
        saved: false,
      })
    } finally {
      count.stop()
      await srv.close()
    }
  })

  // README (Aborts): "... and it had a session, the client gets 500 instead: its work was rolled
  // back, and a 2xx must mean committed". README (Options): "transaction: 'none'": statements
  // autocommit. With transaction: 'none' nothing is rolled back: the INSERT before the timeout
  // was committed when it ran. Expected: the 201 the handler wrote (the work is saved).
  // What happened (fixed in session 6): the client gets 500 for the saved row (the opposite lie), and onError is told
  // the work "was aborted and rolled back".
  it("transaction: 'none': an autocommitted INSERT, a timeout that lets the request go on, then a 201: the client gets the 201 for the saved row", async () => {
    const srv = await serve(
      (app) => {
        app.post('/none/:id', async (req, res) => {
          res.setTimeout(100, () => {
            /* log only */
          })
          await none.db.query('INSERT INTO items (id) VALUES ($1)', [req.params.id])
          await sleep(300)
          res.status(201).json({ id: req.params.id })
        })
      },
      {},
      none,
    )
    try {
      const r = await rawRequest(srv.url, '/none/nn-1', { method: 'POST' })
      await settled(none)
      const saved = await exists('nn-1')
      expect({ status: r.status, saved }).toEqual({ status: saved ? 201 : 500, saved })
    } finally {
      await srv.close()
    }
  })

  // README: "A request that never made a session (no getSession(), no statement), or whose
  // session has nothing to commit (no statement ran ...), has nothing to wait for: its end goes
  // out at once". Here a session was made (getSession(), as a repository built at the start of
  // every request does) but no statement ran; a timeout fires and the request goes on to answer
  // 200 from a cache. Nothing was rolled back: there was no unit of work.
  // Expected: the 200 (as without the timeout). What happened (fixed in session 6): 500, reported as "its unit of work
  // was aborted and rolled back".
  it('a session made but no statement, a timeout that lets the request go on, then a 200: the client gets the 200', async () => {
    const srv = await serve((app) => {
      app.get('/cached', async (_req, res) => {
        d.scope.getSession()
        res.setTimeout(100, () => {
          /* log only */
        })
        await sleep(300)
        res.json({ from: 'cache' })
      })
    })
    try {
      const r = await rawRequest(srv.url, '/cached')
      await settled(d)
      expect({ status: r.status, body: r.body }).toEqual({
        status: 200,
        body: '{"from":"cache"}',
      })
    } finally {
      await srv.close()
    }
  })

  // README (Aborts): "A res.setTimeout(ms, callback) that answers (say, 503): the timeout aborts
  // the unit of work first, then the callback's 503 goes out at once". A callback that answers
  // 408 Request Timeout instead (koa-timeout's status, a common choice): the unit was aborted
  // and rolled back, and 408 claims nothing was done. Expected: the callback's 408 goes out.
  // What happened (fixed in session 6): 408 < 500 is what the default commitOn would commit, so the aborted-unit rule
  // replaces the timeout's own answer with a 500 'Internal Server Error'.
  it('a timeout callback that answers 408: the client gets the 408; nothing saved, one release', async () => {
    const srv = await serve((app) => {
      app.post('/slow/:id', async (req, res) => {
        res.setTimeout(100, () => {
          res.status(408).send('Request Timeout')
        })
        await d.db.query('INSERT INTO items (id) VALUES ($1)', [req.params.id])
        await sleep(300)
        if (!res.headersSent) res.status(201).json({ id: req.params.id })
      })
    })
    const count = releases(d.scope.name)
    try {
      const r = await rawRequest(srv.url, '/slow/to-408', { method: 'POST' })
      await settled(d)
      expect(count.count).toBe(1)
      expect({ status: r.status, body: r.body, saved: await exists('to-408') }).toEqual({
        status: 408,
        body: 'Request Timeout',
        saved: false,
      })
    } finally {
      count.stop()
      await srv.close()
    }
  })

  it('a timeout callback that answers 503: the 503 goes out at once; nothing saved, one release', async () => {
    const srv = await serve((app) => {
      app.post('/slow503/:id', async (req, res) => {
        res.setTimeout(100, () => {
          res.status(503).send('try later')
        })
        await d.db.query('INSERT INTO items (id) VALUES ($1)', [req.params.id])
        await sleep(300)
        if (!res.headersSent) res.status(201).json({ id: req.params.id })
      })
    })
    const count = releases(d.scope.name)
    try {
      const r = await rawRequest(srv.url, '/slow503/to-503', { method: 'POST' })
      await settled(d)
      expect(count.count).toBe(1)
      expect({ status: r.status, body: r.body, saved: await exists('to-503') }).toEqual({
        status: 503,
        body: 'try later',
        saved: false,
      })
    } finally {
      count.stop()
      await srv.close()
    }
  })

  // README (Options, commitOn), before session 6: "Not asked for an aborted request (it rolls
  // back)." The aborted-unit rule asked it to tell whether the response claims a commit, and
  // swallowed its throw: the code and the README disagreed. Resolved by the README (it is
  // asked once, for that, when such a request answers a success with a transaction open) and
  // the code (a throw there is reported, and the answer is 500).
  it('commitOn of a timed-out request that goes on is asked once, whether its 201 claims a commit', async () => {
    const asked: number[] = []
    const srv = await serve(
      (app) => {
        app.post('/asked/:id', async (req, res) => {
          res.setTimeout(100, () => {
            /* log only */
          })
          await d.db.query('INSERT INTO items (id) VALUES ($1)', [req.params.id])
          await sleep(300)
          res.status(201).json({ id: req.params.id })
        })
      },
      {
        commitOn: ({ status, error }) => {
          asked.push(status)
          return error === undefined && status < 500
        },
      },
    )
    try {
      const r = await rawRequest(srv.url, '/asked/ca-1', { method: 'POST' })
      await settled(d)
      expect(r.status).toBe(500)
      expect(asked).toEqual([201])
      expect(await exists('ca-1')).toBe(false)
    } finally {
      await srv.close()
    }
  })

  it('a custom commitOn that does not commit a 202: the timed-out request’s 202 goes out as it is, nothing saved', async () => {
    const srv = await serve(
      (app) => {
        app.post('/custom/:id', async (req, res) => {
          res.setTimeout(100, () => {
            /* log only */
          })
          await d.db.query('INSERT INTO items (id) VALUES ($1)', [req.params.id])
          await sleep(300)
          res.status(202).json({ queued: true })
        })
      },
      { commitOn: ({ status }) => status !== 202 },
    )
    try {
      const r = await rawRequest(srv.url, '/custom/cc-1', { method: 'POST' })
      await settled(d)
      expect({ status: r.status, saved: await exists('cc-1') }).toEqual({
        status: 202,
        saved: false,
      })
    } finally {
      await srv.close()
    }
  })
})

describe("Express's final handler after the held end, when the request body is still arriving", () => {
  // finalhandler writes its answer only once the request is finished (onFinished(req, write),
  // after req.resume()); it checks res.headersSent before that. A POST whose body the handler
  // does not read, answered with res.json() and then next() in the same turn (a 404 from the
  // final handler): while the end is held, headersSent is false, so finalhandler schedules its
  // write for the end of the request body. If the COMMIT is done and the held response sent
  // before the rest of the body arrives, that write runs on a sent response
  // (res.removeHeader() throws ERR_HTTP_HEADERS_SENT from inside the request's 'end' event).
  // Expected: the client gets the 201 and the server keeps running (plain Express would have
  // destroyed the socket: headersSent was true at its check).
  // What happened (fixed in session 6): the 201 goes out and is committed, then finalhandler's deferred write throws
  // ERR_HTTP_HEADERS_SENT ("Cannot remove headers after they are sent") out of an event
  // listener: an uncaughtException, which ends a process that has no handler for it.
  it('a slow request body, res.status(201).json() then next(): the 201 is committed and nothing throws afterwards', async () => {
    const uncaught: unknown[] = []
    const onUncaught = (e: unknown) => uncaught.push(e)
    const listeners = process.listeners('uncaughtException')
    process.removeAllListeners('uncaughtException')
    process.on('uncaughtException', onUncaught)
    const srv = await serve((app) => {
      app.post('/slow-body/:id', async (req, res, next) => {
        await d.db.query('INSERT INTO items (id) VALUES ($1)', [req.params.id])
        res.status(201).json({ ok: true })
        next()
      })
    })
    try {
      const socket = net.connect(srv.port, '127.0.0.1')
      await new Promise<void>((r) => socket.once('connect', () => r()))
      let received = ''
      socket.setEncoding('utf8')
      socket.on('data', (c: string) => {
        received += c
      })
      socket.write(
        'POST /slow-body/sb-1 HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 10\r\nConnection: close\r\n\r\nabcde',
      )
      await sleep(300) // the handler answered, the COMMIT ran, the 201 went out
      socket.write('fghij') // the rest of the body: the request ends now
      await sleep(200)
      socket.destroy()
      await settled(d)
      expect(received.split('\r\n')[0]).toBe('HTTP/1.1 201 Created')
      expect(await exists('sb-1')).toBe(true)
      expect(uncaught.map((e) => (e as { code?: unknown }).code ?? String(e))).toEqual([])
    } finally {
      process.off('uncaughtException', onUncaught)
      for (const l of listeners) process.on('uncaughtException', l)
      await srv.close()
    }
  })
})
