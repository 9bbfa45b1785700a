/**
 * Session 6 review probes: the README's claims, one by one, over a real
 * server on 127.0.0.1, real sockets and a real PostgreSQL. Each test names the
 * claim it checks. A test marked `it.fails` asserts what the README promises
 * where the library does otherwise (its comment quotes the sentence and says
 * what happens); the others are regression tests of claims that hold.
 */
import { randomBytes } from 'node:crypto'
import http from 'node:http'
import { scopedSession } from '@scoped/express'
import compression from 'compression'
import express, { type NextFunction, type Request, type Response } from 'express'
import pg from 'pg'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import { type Db, latch, listen, makeDb, rawRequest, releases, settled } from './support.ts'

let url: string
let d: Db
let observer: pg.Client
let reported: { during: string; error: unknown }[] = []

beforeAll(async () => {
  url = await testDatabase('express_review_s6')
  await independentQuery(
    url,
    `CREATE TABLE items (id text PRIMARY KEY);
     CREATE TABLE parent (id int PRIMARY KEY);
     CREATE TABLE child (id text PRIMARY KEY,
       parent_id int REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);`,
  )
  d = makeDb(url, 'express_review_s6', {
    onError: (error, { during }) => reported.push({ during, error }),
  })
  observer = new pg.Client({ connectionString: url })
  await observer.connect()
})

afterAll(async () => {
  await observer.end()
  await d.close()
})

beforeEach(() => {
  reported = []
})

async function exists(table: 'items' | 'child', id: string): Promise<boolean> {
  const { rows } = await observer.query(`SELECT 1 FROM ${table} WHERE id = $1`, [id])
  return rows.length === 1
}

const insert = (id: string) => d.db.query('INSERT INTO items (id) VALUES ($1)', [id])
const insertOrphan = (id: string) =>
  d.db.query('INSERT INTO child (id, parent_id) VALUES ($1, 999)', [id])
const errorName = (e: unknown) => (e as Error).name

async function serve(
  setup: (app: express.Express) => void,
  options: Parameters<typeof scopedSession>[1] = {},
  before?: (app: express.Express) => void,
) {
  const app = express()
  before?.(app)
  app.use(scopedSession(d.scope, options))
  setup(app)
  return listen(app)
}

/** A request on its own socket that the test can destroy (a real client abort). */
function abortable(port: number, path: string) {
  const req = http.request({ host: '127.0.0.1', port, path, agent: false })
  const done = new Promise<string>((resolve) => {
    req.on('error', (e) => resolve(`error: ${e.message}`))
    req.on('response', (res) => {
      res.resume()
      res.on('end', () => resolve(`status ${res.statusCode}`))
      res.on('aborted', () => resolve('aborted'))
    })
  })
  req.end()
  return { abort: () => req.destroy(), done }
}

describe('aborts and timeouts', () => {
  // README (Limits): "Callback-style handlers (that return before their work is done) count as
  // settled when they return: after an abort, their later statements fail with
  // SessionClosedError instead of ScopeAbortedError."
  it('a callback-style handler: after the client left, its later statement fails with SessionClosedError; rollback, one release', async () => {
    const inserted = latch()
    const finished = latch<string>()
    const srv = await serve((app) => {
      app.get('/cb/:id', (req) => {
        const id = req.params.id as string
        const session = d.scope.getSession()
        const gone = new Promise<void>((r) => session.signal.addEventListener('abort', () => r()))
        insert(id)
          .then(() => inserted.resolve())
          .then(() => gone)
          .then(() => new Promise((r) => setTimeout(r, 50)))
          .then(() => insert(`${id}-after`))
          .then(
            () => finished.resolve('completed'),
            (e) => finished.resolve(errorName(e)),
          )
      })
    })
    const count = releases(d.scope.name)
    try {
      const client = abortable(srv.port, '/cb/cb-1')
      await inserted.promise
      client.abort()
      expect(await finished.promise).toBe('SessionClosedError')
      await settled(d)
      expect(count.count).toBe(1)
      expect(await exists('items', 'cb-1')).toBe(false)
      expect(await exists('items', 'cb-1-after')).toBe(false)
    } finally {
      count.stop()
      await srv.close()
    }
  })

  // README (Aborts): "Filter err.code === 'SCOPE_ABORTED' in your error handler if you do not
  // want them in the log."
  it("the error handler of an aborted request gets the ScopeAbortedError with code 'SCOPE_ABORTED'", async () => {
    const inserted = latch()
    const seen = latch<{ name: string; code: unknown }>()
    const srv = await serve((app) => {
      app.get('/abort/:id', async (req, res) => {
        const session = d.scope.getSession()
        const gone = new Promise<void>((r) => session.signal.addEventListener('abort', () => r()))
        await insert(req.params.id as string)
        inserted.resolve()
        await gone
        await insert(`${req.params.id}-after`)
        res.send('never')
      })
      app.use((err: unknown, _req: Request, res: Response, _next: NextFunction) => {
        seen.resolve({ name: errorName(err), code: (err as { code?: unknown }).code })
        res.status(500).end()
      })
    })
    const count = releases(d.scope.name)
    try {
      const client = abortable(srv.port, '/abort/ab-1')
      await inserted.promise
      client.abort()
      expect(await seen.promise).toEqual({ name: 'ScopeAbortedError', code: 'SCOPE_ABORTED' })
      await settled(d)
      expect(count.count).toBe(1)
      expect(await exists('items', 'ab-1')).toBe(false)
    } finally {
      count.stop()
      await srv.close()
    }
  })

  // README (Aborts): "A socket timeout aborts the unit of work even if a callback chooses to let
  // the request go on." The headline promise is "committed before the response is sent": a
  // client that receives a clean 2xx should find the work saved. A res.setTimeout() callback
  // that only logs (the request goes on) while the handler awaits something slow, after which
  // the handler answers 201 with no further statement:
  // Was a bug (fixed in session 6): the unit of work was rolled back (aborted by the timeout)
  // yet the client received a clean 201 for it. Now the aborted unit answers 500 at res.end(),
  // as a failed COMMIT does.
  it('res.setTimeout(ms, log only), then a 201 with no statement after the timeout: the client is not told 201 for rolled-back work', async () => {
    const srv = await serve((app) => {
      app.post('/slow/:id', async (req, res) => {
        res.setTimeout(100, () => {
          /* a logger: the request is allowed to go on */
        })
        await insert(req.params.id as string)
        await new Promise((r) => setTimeout(r, 300)) // a slow call to another service
        res.status(201).json({ id: req.params.id })
      })
    })
    const count = releases(d.scope.name)
    try {
      const r = await rawRequest(srv.url, '/slow/to-1', { method: 'POST' })
      await settled(d)
      expect(count.count).toBe(1)
      const saved = await exists('items', 'to-1')
      // What the client saw and what was saved must agree.
      expect({ status: r.status, ended: r.ended, saved }).toEqual({
        status: saved ? 201 : 500,
        ended: 'complete',
        saved,
      })
    } finally {
      count.stop()
      await srv.close()
    }
  })
})

describe('commitOn', () => {
  // README: "A request that never made a session ... has nothing to wait for: its end goes out at
  // once and its scope ends right there (commitOn is still asked, and still answers 500 if it
  // throws)."
  it('a commitOn that throws on a request that never made a session: a 500, reported, nothing checked out', async () => {
    let asked = 0
    const srv = await serve(
      (app) => {
        app.get('/plain', (_req, res) => {
          res.send('no database')
        })
      },
      {
        commitOn: () => {
          asked++
          throw new Error('commitOn broke')
        },
      },
    )
    try {
      const res = await fetch(`${srv.url}/plain`)
      expect(res.status).toBe(500)
      await res.arrayBuffer()
      await settled(d)
      expect(asked).toBe(1)
      expect(d.scope.stats().open).toBe(0)
    } finally {
      await srv.close()
    }
  })

  // README (Options): "so does returning anything but true or false (an async function's
  // Promise, a forgotten return: a TypeError saying so)."
  it('a commitOn with a forgotten return (undefined): a 500, nothing stored, a TypeError naming commitOn reported, one release', async () => {
    const srv = await serve(
      (app) => {
        app.post('/forgot/:id', async (req, res) => {
          await insert(req.params.id as string)
          res.status(201).json({ id: req.params.id })
        })
      },
      {
        // The forgotten return is the point.
        commitOn: (({ status }: { status: number }) => {
          status < 500
        }) as never,
      },
    )
    const count = releases(d.scope.name)
    try {
      const res = await fetch(`${srv.url}/forgot/fr-1`, { method: 'POST' })
      expect(res.status).toBe(500)
      await res.arrayBuffer()
      await settled(d)
      expect(count.count).toBe(1)
      expect(await exists('items', 'fr-1')).toBe(false)
      const typeErrors = reported.filter((r) => r.error instanceof TypeError)
      expect(typeErrors).toHaveLength(1)
      expect((typeErrors[0]!.error as Error).message).toMatch(/commitOn/)
    } finally {
      count.stop()
      await srv.close()
    }
  })
})

describe('a failed COMMIT', () => {
  // README: "the handler's Set-Cookie, Location, ETag and body headers are dropped, other headers
  // (CORS, request ids) are kept."
  it('the 500 drops Set-Cookie, Location and ETag and keeps CORS and request-id headers set before the handler', async () => {
    const srv = await serve(
      (app) => {
        app.post('/orphan/:id', async (req, res) => {
          await insertOrphan(req.params.id as string)
          res.cookie('session', 'abc')
          res.location(`/orphan/${req.params.id}`)
          res.setHeader('ETag', '"v1"')
          res.status(201).json({ id: req.params.id })
        })
      },
      {},
      (app) => {
        app.use((_req, res, next) => {
          res.setHeader('Access-Control-Allow-Origin', 'https://example.test')
          res.setHeader('X-Request-Id', 'rid-1')
          next()
        })
      },
    )
    try {
      const res = await fetch(`${srv.url}/orphan/fc-1`, { method: 'POST' })
      expect(res.status).toBe(500)
      expect(res.headers.get('content-type')).toMatch(/^text\/plain/)
      expect(res.headers.get('set-cookie')).toBeNull()
      expect(res.headers.get('location')).toBeNull()
      expect(res.headers.get('etag')).toBeNull()
      expect(res.headers.get('access-control-allow-origin')).toBe('https://example.test')
      expect(res.headers.get('x-request-id')).toBe('rid-1')
      await res.arrayBuffer()
      await settled(d)
      expect(await exists('child', 'fc-1')).toBe(false)
    } finally {
      await srv.close()
    }
  })

  // README (Streaming): "an encoded body ... is held until its end, up to 64 KiB ... a larger one
  // flows as a stream (its end waits for the COMMIT)." and "If that COMMIT fails, the connection
  // is destroyed: the client gets an incomplete body and an error, never a clean end."
  it('a compressed body larger than 64 KiB whose COMMIT fails: never a clean end, nothing stored, one release', async () => {
    const payload = randomBytes(150_000).toString('hex') // ~300 KB, ~150 KB gzipped
    const srv = await serve(
      (app) => {
        app.post('/big/:id', async (req, res) => {
          await insertOrphan(req.params.id as string)
          res.json({ payload })
        })
      },
      {},
      (app) => app.use(compression()),
    )
    const count = releases(d.scope.name)
    try {
      const r = await rawRequest(srv.url, '/big/gz-big-1', {
        method: 'POST',
        headers: { 'accept-encoding': 'gzip' },
      })
      expect(r.ended === 'error' || r.status === 500).toBe(true)
      await settled(d)
      expect(count.count).toBe(1)
      expect(await exists('child', 'gz-big-1')).toBe(false)
    } finally {
      count.stop()
      await srv.close()
    }
  })
})

describe('boundaries the README leaves to the reader', () => {
  // A SQLAlchemy/Django user expects: an error after the response started rolls back, and the
  // client does not get a clean end.
  it('a handler that writes a chunk, inserts, then throws: rolled back, the client sees the response break off, one release', async () => {
    const srv = await serve((app) => {
      app.get('/write-throw/:id', async (req, res) => {
        res.write('first part;')
        await insert(req.params.id as string)
        throw new Error('failed mid-body')
      })
    })
    const count = releases(d.scope.name)
    try {
      const r = await rawRequest(srv.url, '/write-throw/wt-1')
      expect(r.status).toBe(200)
      expect(r.ended).toBe('error')
      await settled(d)
      expect(count.count).toBe(1)
      expect(await exists('items', 'wt-1')).toBe(false)
    } finally {
      count.stop()
      await srv.close()
    }
  })

  // README: "a thrown error rolls back whatever the error handler answered" and error handlers run
  // inside the scope: what the error handler itself writes is part of the same unit.
  it('an error handler that records the failure in the database and answers 200: its row rolls back with the rest, in the same session', async () => {
    const sessions: unknown[] = []
    const srv = await serve((app) => {
      app.post('/eh/:id', async (req) => {
        sessions.push(d.scope.getSession())
        await insert(req.params.id as string)
        throw new Error('expected')
      })
      app.use(async (_err: unknown, req: Request, res: Response, _next: NextFunction) => {
        sessions.push(d.scope.getSession())
        await insert(`${req.params.id ?? req.path.split('/').pop()}-log`)
        res.status(200).send('recovered')
      })
    })
    const count = releases(d.scope.name)
    try {
      const res = await fetch(`${srv.url}/eh/eh-1`, { method: 'POST' })
      expect(res.status).toBe(200)
      await res.arrayBuffer()
      await settled(d)
      expect(count.count).toBe(1)
      expect(sessions).toHaveLength(2)
      expect(sessions[1]).toBe(sessions[0])
      expect(await exists('items', 'eh-1')).toBe(false)
      expect(await exists('items', 'eh-1-log')).toBe(false)
    } finally {
      count.stop()
      await srv.close()
    }
  })

  // README (Runs inside): "listeners on req/res added after the middleware and before the response
  // ends (… a 'finish' logger added in a handler). getSession() anywhere there returns this
  // request's session." and "Work after the response ... its statements fail with
  // SessionClosedError."
  it("a 'finish' listener added in the handler sees the request's session; a statement there fails with SessionClosedError, nothing checked out again", async () => {
    const result = latch<{ same: boolean; outcome: string }>()
    const srv = await serve((app) => {
      app.post('/finish/:id', async (req, res) => {
        const mine = d.scope.getSession()
        res.on('finish', () => {
          const same = d.scope.getSession() === mine
          insert(`${req.params.id}-audit`).then(
            () => result.resolve({ same, outcome: 'completed' }),
            (e) => result.resolve({ same, outcome: errorName(e) }),
          )
        })
        await insert(req.params.id as string)
        res.status(201).send('ok')
      })
    })
    const count = releases(d.scope.name)
    try {
      const res = await fetch(`${srv.url}/finish/fin-1`, { method: 'POST' })
      expect(res.status).toBe(201)
      await res.arrayBuffer()
      expect(await result.promise).toEqual({ same: true, outcome: 'SessionClosedError' })
      await settled(d)
      expect(count.count).toBe(1)
      expect(await exists('items', 'fin-1')).toBe(true)
      expect(await exists('items', 'fin-1-audit')).toBe(false)
    } finally {
      count.stop()
      await srv.close()
    }
  })

  // README (Limits): "Errors raised while Express matches a route, before any handler runs, that go
  // straight to Express's final handler (a malformed % in a route parameter: 400) are not
  // reported on the channel; the status decides." A 400 < 500: what ran before commits.
  it('a malformed % in a route parameter after a middleware that wrote: a 400, and (as documented) the write commits', async () => {
    const srv = await serve((app) => {
      app.use(async (req, _res, next) => {
        await insert(String(req.headers['x-id']))
        next()
      })
      app.get('/p/:name', (_req, res) => {
        res.send('never')
      })
    })
    const count = releases(d.scope.name)
    try {
      const r = await rawRequest(srv.url, '/p/%E0%A4%A', { headers: { 'x-id': 'pct-1' } })
      expect(r.status).toBe(400)
      await settled(d)
      expect(count.count).toBe(1)
      expect(await exists('items', 'pct-1')).toBe(true)
    } finally {
      count.stop()
      await srv.close()
    }
  })
})

describe('two scopes on one app', () => {
  // README (Limits): "two different scopes can both be mounted and each gets its own session." The
  // headline promise is "committed before the response is sent" and, by default, a status >= 500
  // rolls back: when one scope's COMMIT fails the client gets a 500, and the other scope's work
  // should not stay committed behind it where it can still be rolled back (@scoped/hono rolls
  // the other scope back: its review-s4 "the inner scope's failed COMMIT is a 500 and the outer
  // scope rolls back").
  //
  // The second (inner) scope failing holds: its res.end hook runs first, its failed COMMIT turns the
  // response into a 500, and the first scope, asked about a 500, rolls back.
  // LIMIT (first; documented in the README's Limits since session 6): the inner scope has COMMITted before the outer one's COMMIT fails:
  // the client gets a 500 while the second database keeps the row (kept: { first: false, second:
  // true }). Without two-phase commit one order of failure always does this (@scoped/hono: the
  // same order; @scoped/fastify: the other order); the README does not say which scope commits
  // first nor that a 500 can follow committed work of the other scope.
  for (const failing of ['first', 'second'] as const) {
    ;(failing === 'first' ? it.fails : it)(
      `the ${failing} mounted scope's COMMIT fails: a 500, and neither scope keeps the work`,
      async () => {
        const other = makeDb(url, `express_review_s6_${failing}`)
        const otherCount = releases(other.scope.name)
        const count = releases(d.scope.name)
        const app = express()
        app.use(scopedSession(d.scope))
        app.use(scopedSession(other.scope))
        app.post('/two/:id', async (req, res) => {
          const id = req.params.id as string
          if (failing === 'first') {
            await insertOrphan(id)
            await other.db.query('INSERT INTO items (id) VALUES ($1)', [`${id}-other`])
          } else {
            await insert(id)
            await other.db.query('INSERT INTO child (id, parent_id) VALUES ($1, 999)', [
              `${id}-other`,
            ])
          }
          res.status(201).json({ id })
        })
        const srv = await listen(app)
        try {
          const r = await rawRequest(srv.url, `/two/two-${failing}`, { method: 'POST' })
          await settled(d)
          await settled(other)
          expect(count.count).toBe(1)
          expect(otherCount.count).toBe(1)
          const id = `two-${failing}`
          const kept = {
            first: (await exists('items', id)) || (await exists('child', id)),
            second:
              (await exists('items', `${id}-other`)) || (await exists('child', `${id}-other`)),
          }
          expect({ status: r.status, kept }).toEqual({
            status: 500,
            kept: { first: false, second: false },
          })
        } finally {
          count.stop()
          otherCount.stop()
          await srv.close()
          await other.close()
        }
      },
    )
  }
})

describe('right after res.json()', () => {
  // README: "Work after the response (res.json(x); await more()) is outside the unit of work: its
  // statements fail with SessionClosedError." Here the statement is issued in the same turn as
  // res.json(), while the COMMIT has not run yet.
  it('a statement issued in the same turn as res.json(): fails with SessionClosedError; the answered work is committed', async () => {
    const after = latch<string>()
    const srv = await serve((app) => {
      app.post('/then/:id', async (req, res) => {
        const id = req.params.id as string
        await insert(id)
        res.status(201).json({ id })
        try {
          await insert(`${id}-after`)
          after.resolve('completed')
        } catch (e) {
          after.resolve(errorName(e))
        }
      })
    })
    const count = releases(d.scope.name)
    try {
      const r = await rawRequest(srv.url, '/then/sj-1', { method: 'POST' })
      expect(r).toMatchObject({ status: 201, ended: 'complete' })
      expect(await after.promise).toBe('SessionClosedError')
      await settled(d)
      expect(count.count).toBe(1)
      expect(await exists('items', 'sj-1')).toBe(true)
      expect(await exists('items', 'sj-1-after')).toBe(false)
    } finally {
      count.stop()
      await srv.close()
    }
  })

  // README: "The first res.end() decides" and, when commitOn says yes, the response is "held until
  // the COMMIT succeeded, then sent as written". A handler that answers, then throws in the same
  // turn (a bug after the answer; plain Express sends the complete 201 and logs the error): what
  // the client sees and what is saved must agree.
  // Was a bug (fixed in session 6, the held response keeps the status and headers it was ended with): the row is committed, but the client gets status 500 with the 201's body
  // ({"id":"at-1"}) and then the connection breaks off (ended: 'error'). While the end is held for
  // the COMMIT, res.headersSent is false, so Express's final handler treats the error as
  // unanswered: it sets res.statusCode = 500 on the held response (which then goes out with the
  // handler's body) and its own 500 cuts the socket. Expected: the complete 201 as written (the
  // first res.end() decided and committed), as without the middleware.
  it('res.json() then a throw in the same turn: the client’s answer and the saved work agree, one release', async () => {
    const srv = await serve((app) => {
      app.post('/answer-throw/:id', async (req, res) => {
        const id = req.params.id as string
        await insert(id)
        res.status(201).json({ id })
        throw new Error('a bug after the answer')
      })
    })
    const count = releases(d.scope.name)
    try {
      const r = await rawRequest(srv.url, '/answer-throw/at-1', { method: 'POST' })
      await settled(d)
      expect(count.count).toBe(1)
      const saved = await exists('items', 'at-1')
      expect({ status: r.status, ended: r.ended, saved }).toEqual(
        saved
          ? { status: 201, ended: 'complete', saved: true }
          : { status: 500, ended: 'complete', saved: false },
      )
    } finally {
      count.stop()
      await srv.close()
    }
  })
})

describe('right after res.json(), Express itself', () => {
  // README: the first res.end() decides, and the response is "held until the COMMIT succeeded,
  // then sent as written". A middleware that answers and still calls next() (a common slip), with
  // no route after it: plain Express sends the complete 201 (its final 404 handler finds the
  // headers sent).
  // Was a bug (fixed in session 6, as above): the row is committed, but the client gets status 404 with the 201's body
  // ({"id":"jn-1"}) and then the connection breaks off (ended: 'error'). Same cause as the throw
  // above: while the end is held for the COMMIT, res.headersSent is false, so Express's final
  // handler sets res.statusCode = 404 on the held response and its own 404 cuts the socket.
  it('res.json() then next() with nothing after: the client gets the 201 as written, committed', async () => {
    const srv = await serve((app) => {
      app.use(async (req, res, next) => {
        const id = String(req.headers['x-id'])
        await insert(id)
        res.status(201).json({ id })
        next()
      })
    })
    const count = releases(d.scope.name)
    try {
      const r = await rawRequest(srv.url, '/anything', {
        method: 'POST',
        headers: { 'x-id': 'jn-1' },
      })
      await settled(d)
      expect(count.count).toBe(1)
      expect({ status: r.status, ended: r.ended, body: r.body }).toEqual({
        status: 201,
        ended: 'complete',
        body: '{"id":"jn-1"}',
      })
      expect(await exists('items', 'jn-1')).toBe(true)
    } finally {
      count.stop()
      await srv.close()
    }
  })
})

describe('a socket timeout while the COMMIT runs', () => {
  // README (Aborts): "A res.setTimeout(ms, callback) that answers (say, 503): the timeout aborts the
  // unit of work first, then the callback's 503 goes out at once". Here the timeout fires while
  // the COMMIT (decided by the first res.end()) is blocked on another transaction's lock; the
  // callback answers 503 if nothing was sent (the connect-timeout pattern). What the client sees
  // and what is saved must agree.
  // Was a bug (fixed in session 6, as above): the COMMIT goes through (saved), but the client gets status 503 with the handler's body
  // ('saved') and then the connection breaks off (ended: 'error'). While the end is held,
  // res.headersSent is false, so the callback's res.status(503) rewrites the held response's
  // status and its send() cuts the socket. Expected: the 201 as written once it is committed
  // (or a 503 with nothing saved), never a 503 for committed work.
  it('a 503 from the timeout callback during a blocked COMMIT: the client’s answer and the saved work agree, one release', async () => {
    await independentQuery(
      url,
      `CREATE TABLE IF NOT EXISTS uniq (k text,
         CONSTRAINT uniq_k UNIQUE (k) DEFERRABLE INITIALLY DEFERRED)`,
    )
    const blocker = new pg.Client({ connectionString: url })
    await blocker.connect()
    await blocker.query('BEGIN')
    await blocker.query(`INSERT INTO uniq (k) VALUES ('blocked-1')`)
    const srv = await serve((app) => {
      app.post('/blocked', async (_req, res) => {
        res.setTimeout(150, () => {
          if (!res.headersSent) res.status(503).send('timed out')
        })
        await d.db.query(`INSERT INTO uniq (k) VALUES ('blocked-1')`)
        res.status(201).send('saved')
      })
    })
    const count = releases(d.scope.name)
    try {
      const pending = rawRequest(srv.url, '/blocked', { method: 'POST' })
      // Let the COMMIT block on the uncommitted duplicate, and the timeout fire meanwhile.
      await new Promise((r) => setTimeout(r, 400))
      await blocker.query('ROLLBACK') // the COMMIT can now succeed
      const r = await pending
      await settled(d)
      expect(count.count).toBe(1)
      const saved =
        (await observer.query(`SELECT 1 FROM uniq WHERE k = 'blocked-1'`)).rows.length === 1
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

describe('runJob() from a request', () => {
  // README: "Work after the response … Run respond-now-work-later code in its own runJob(...)." A
  // Django/SQLAlchemy user also expects a job started inside the request to be its own unit:
  // committed on its own even when the request rolls back.
  it('a runJob() started before a throw commits on its own; one started after the response commits too; the request rolls back', async () => {
    const later = latch<string>()
    const srv = await serve((app) => {
      app.post('/jobs/:id', async (req, res) => {
        const id = req.params.id as string
        await insert(id)
        await d.scope.runJob(() => insert(`${id}-job`))
        if (req.query.fail) throw new Error('request failed')
        res.status(201).send('ok')
        d.scope
          .runJob(() => insert(`${id}-later`))
          .then(
            () => later.resolve('completed'),
            (e) => later.resolve(errorName(e)),
          )
      })
    })
    const count = releases(d.scope.name)
    try {
      const failed = await rawRequest(srv.url, '/jobs/rj-fail?fail=1', { method: 'POST' })
      expect(failed.status).toBe(500)
      const ok = await rawRequest(srv.url, '/jobs/rj-ok', { method: 'POST' })
      expect(ok.status).toBe(201)
      expect(await later.promise).toBe('completed')
      await settled(d)
      expect(count.count).toBe(5) // two requests, three jobs
      expect(await exists('items', 'rj-fail')).toBe(false)
      expect(await exists('items', 'rj-fail-job')).toBe(true)
      expect(await exists('items', 'rj-ok')).toBe(true)
      expect(await exists('items', 'rj-ok-job')).toBe(true)
      expect(await exists('items', 'rj-ok-later')).toBe(true)
    } finally {
      count.stop()
      await srv.close()
    }
  })
})
