/**
 * Clients that go away and requests that run out of time: the unit of work
 * rolls back, the connection stays with the handler until it settled, the
 * handler's next statement fails with a clear error, and exactly one release.
 */
import dc from 'node:diagnostics_channel'
import http from 'node:http'
import { ScopeAbortedError } from '@scoped/core'
import { scopedSession } from '@scoped/express'
import express, { type Express } from 'express'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import {
  type Db,
  latch,
  listen,
  makeDb,
  openTransactions,
  rawRequest,
  releases,
  type Server,
  settled,
} from './support.ts'

let url: string
let d: Db

beforeAll(async () => {
  url = await testDatabase('express_abort')
  await independentQuery(url, 'CREATE TABLE items (id text PRIMARY KEY)')
  d = makeDb(url, 'express_abort')
})

afterAll(async () => {
  await d.close()
})

async function exists(id: string): Promise<boolean> {
  return (await independentQuery(url, 'SELECT 1 FROM items WHERE id = $1', [id])).length === 1
}

const insert = (id: string) => d.db.query('INSERT INTO items (id) VALUES ($1)', [id])

/** Start a request and return a way to cut it off (the socket is destroyed, as a closed tab does). */
function startRequest(
  srv: Server,
  path: string,
  method = 'GET',
): { abort(): void; done: Promise<string> } {
  const req = http.request(`${srv.url}${path}`, { method, agent: false })
  const done = new Promise<string>((resolve) => {
    req.on('error', (e) => resolve(`error: ${e.message}`))
    req.on('response', (res) => {
      res.resume()
      res.on('end', () => resolve(`status ${res.statusCode}`))
    })
  })
  req.end()
  return { abort: () => req.destroy(), done }
}

/** Record the order of what the handler does and when the connection is released. */
function timeline(scopeName: string) {
  const events: string[] = []
  const onRelease = (m: unknown) => {
    if ((m as { scope: string }).scope === scopeName) events.push('release')
  }
  dc.subscribe('scoped:release', onRelease)
  return { events, stop: () => dc.unsubscribe('scoped:release', onRelease) }
}

/**
 * A handler that writes, sleeps in the database, then tries one more statement:
 * what the test looks at is the order of its steps and the release.
 */
function slowApp(cancelOnAbort: boolean, sleepSeconds: number, events: string[]) {
  const app = express()
  app.use(scopedSession(d.scope, { cancelOnAbort }))
  const sleeping = latch()
  const errors: unknown[] = []
  app.get('/slow/:id', async (req, res) => {
    await insert(req.params.id as string)
    sleeping.resolve()
    try {
      await d.db.query('SELECT pg_sleep($1)', [sleepSeconds])
      events.push('sleep finished')
    } catch (e) {
      events.push(`sleep failed ${(e as { code?: string }).code}`)
    }
    try {
      await d.db.query('SELECT 1')
      events.push('next statement ran')
    } catch (e) {
      errors.push(e)
      events.push('next statement failed')
    }
    events.push(`still holding ${d.scope.stats().holding}`)
    res.send('nobody is listening')
  })
  return { app, sleeping, errors }
}

describe('a client that aborts mid-handler', () => {
  it('keeps the connection until the handler settled; the next statement fails clearly; rollback', async () => {
    const t = timeline(d.scope.name)
    const { app, sleeping, errors } = slowApp(false, 0.3, t.events)
    const srv = await listen(app)
    try {
      const client = startRequest(srv, '/slow/abort-1')
      await sleeping.promise
      client.abort()
      expect(await client.done).toMatch(/^error: socket hang up/)
      await settled(d)
      expect(t.events).toEqual([
        'sleep finished',
        'next statement failed',
        'still holding 1',
        'release',
      ])
      expect(errors[0]).toBeInstanceOf(ScopeAbortedError)
      expect((errors[0] as Error).message).toMatch(
        /^Session 'GET \/slow\/:id' was aborted because the client closed the connection/,
      )
      expect(await exists('abort-1')).toBe(false)
      expect(await openTransactions(url, d)).toEqual([])
    } finally {
      t.stop()
      await srv.close()
    }
  })

  it('with cancelOnAbort, the running pg_sleep is cancelled on the server', async () => {
    const t = timeline(d.scope.name)
    // 30 s: if the cancel did not happen the statement would outlive the test's timeouts.
    const { app, sleeping } = slowApp(true, 30, t.events)
    const srv = await listen(app)
    try {
      const client = startRequest(srv, '/slow/abort-2')
      await sleeping.promise
      client.abort()
      await settled(d)
      // 57014 query_canceled: PostgreSQL stopped the sleep at our request.
      expect(t.events).toEqual([
        'sleep failed 57014',
        'next statement failed',
        'still holding 1',
        'release',
      ])
      expect(await exists('abort-2')).toBe(false)
      const sleepers = await independentQuery(
        url,
        `SELECT pid FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' AND pid <> pg_backend_pid()`,
      )
      expect(sleepers).toEqual([])
    } finally {
      t.stop()
      await srv.close()
    }
  })

  it('a handler that stops without answering after the abort still releases once it returns', async () => {
    const count = releases(d.scope.name)
    const app = express()
    app.use(scopedSession(d.scope))
    const sleeping = latch()
    const returned = latch()
    app.get('/quiet/:id', async (req) => {
      await insert(req.params.id as string)
      sleeping.resolve()
      await d.db.query('SELECT pg_sleep(0.2)')
      // Sees the abort and returns: no response, no error.
      if (d.scope.getSession().signal.aborted) returned.resolve()
    })
    const srv = await listen(app)
    try {
      const client = startRequest(srv, '/quiet/quiet-1')
      await sleeping.promise
      client.abort()
      await returned.promise
      await settled(d)
      expect(count.count).toBe(1)
      expect(await exists('quiet-1')).toBe(false)
    } finally {
      count.stop()
      await srv.close()
    }
  })
})

describe('a client that left before the middleware ran', () => {
  it('finds the unit of work aborted from the start: its first statement fails, nothing is committed', async () => {
    const app = express()
    const gone = latch()
    // An earlier middleware (say, an async auth check) that is still busy when the client goes.
    app.use((_req, res, next) => {
      res.once('close', () => setImmediate(next))
      gone.resolve()
    })
    app.use(scopedSession(d.scope))
    const seen: unknown[] = []
    const handled = latch()
    app.get('/late/:id', async (req, res) => {
      try {
        await insert(req.params.id as string)
        seen.push('inserted')
      } catch (e) {
        seen.push(e)
      }
      handled.resolve()
      res.send('nobody is listening')
    })
    const srv = await listen(app)
    try {
      const client = startRequest(srv, '/late/left-1')
      await gone.promise
      client.abort()
      expect(await client.done).toMatch(/^error: socket hang up/)
      await handled.promise
      await settled(d)
      expect(seen).toHaveLength(1)
      expect(seen[0]).toBeInstanceOf(ScopeAbortedError)
      expect(await exists('left-1')).toBe(false)
      expect(await openTransactions(url, d)).toEqual([])
    } finally {
      await srv.close()
    }
  })
})

describe('a client that aborts during a large request-body upload', () => {
  it('rolls back what ran before the body parser, once, and never reaches the handler', async () => {
    const count = releases(d.scope.name)
    const app = express()
    app.use(scopedSession(d.scope))
    const uploading = latch()
    app.use(async (req, _res, next) => {
      await insert(req.path.slice(1))
      uploading.resolve()
      next()
    })
    app.use(express.json({ limit: '50mb' }))
    let reached = false
    app.post('/upload-1', (_req, res) => {
      reached = true
      res.send('ok')
    })
    const srv = await listen(app)
    try {
      const req = http.request(`${srv.url}/upload-1`, {
        method: 'POST',
        agent: false,
        headers: { 'content-type': 'application/json', 'content-length': String(20 * 1024 * 1024) },
      })
      const failed = new Promise<string>((resolve) => req.on('error', (e) => resolve(e.message)))
      req.write(`{"data":"${'x'.repeat(256 * 1024)}`)
      await uploading.promise
      req.write('x'.repeat(256 * 1024))
      req.destroy()
      await failed
      await settled(d)
      expect(reached).toBe(false)
      expect(count.count).toBe(1)
      expect(await exists('upload-1')).toBe(false)
      expect(await openTransactions(url, d)).toEqual([])
    } finally {
      count.stop()
      await srv.close()
    }
  })
})

describe('timeouts', () => {
  /** An app whose handler writes, reports its session's abort reason, and outlives `res.setTimeout`. */
  function timedApp(onTimeout?: (res: express.Response) => void, cancelOnAbort = false) {
    const app: Express = express()
    app.use(scopedSession(d.scope, { cancelOnAbort }))
    const reasons: string[] = []
    const nextErrors: string[] = []
    const sleeps: string[] = []
    const finished = latch()
    app.get('/timed/:id', async (req, res) => {
      const session = d.scope.getSession()
      session.signal.addEventListener('abort', () =>
        reasons.push((session.signal.reason as Error).message),
      )
      await insert(req.params.id as string)
      if (onTimeout) res.setTimeout(100, () => onTimeout(res))
      else res.setTimeout(100)
      try {
        await d.db.query(`SELECT pg_sleep(${cancelOnAbort ? 30 : 0.4})`)
        sleeps.push('finished')
      } catch (e) {
        sleeps.push(`failed ${(e as { code?: string }).code}`)
      }
      try {
        await d.db.query('SELECT 1')
      } catch (e) {
        nextErrors.push((e as Error).name)
      }
      finished.resolve()
      if (!res.headersSent) res.send('too late')
    })
    return { app, reasons, nextErrors, sleeps, finished }
  }

  it('res.setTimeout() without a callback: the socket is destroyed, the unit of work rolls back', async () => {
    const count = releases(d.scope.name)
    const { app, reasons, nextErrors, finished } = timedApp()
    const srv = await listen(app)
    try {
      const r = await rawRequest(srv.url, '/timed/timeout-1')
      expect(r.ended).toBe('error')
      await finished.promise
      await settled(d)
      expect(reasons).toHaveLength(1)
      expect(reasons[0]).toMatch(
        /was aborted because it ran past its time limit \(socket timeout\)/,
      )
      expect(nextErrors).toEqual(['ScopeAbortedError'])
      expect(count.count).toBe(1)
      expect(await exists('timeout-1')).toBe(false)
    } finally {
      count.stop()
      await srv.close()
    }
  })

  it.each([
    { cancelOnAbort: false, sleep: 'finished' },
    { cancelOnAbort: true, sleep: 'failed 57014' },
  ])(
    'res.setTimeout() answering 503 (cancelOnAbort: $cancelOnAbort): the 503 goes out at once, the unit of work is aborted and rolls back',
    async ({ cancelOnAbort, sleep }) => {
      const count = releases(d.scope.name)
      const { app, reasons, nextErrors, sleeps, finished } = timedApp((res) => {
        res.status(503).send('timed out')
      }, cancelOnAbort)
      const srv = await listen(app)
      try {
        const id = `timeout-503-${cancelOnAbort}`
        const r = await rawRequest(srv.url, `/timed/${id}`)
        expect(r).toMatchObject({ status: 503, body: 'timed out', ended: 'complete' })
        await finished.promise
        await settled(d)
        expect(reasons).toHaveLength(1)
        expect(reasons[0]).toMatch(/ran past its time limit/)
        // Without cancelOnAbort the statement runs to its end; with it, PostgreSQL cancels it.
        expect(sleeps).toEqual([sleep])
        expect(nextErrors).toEqual(['ScopeAbortedError'])
        expect(count.count).toBe(1)
        expect(await exists(id)).toBe(false)
      } finally {
        count.stop()
        await srv.close()
      }
    },
  )

  it('server.requestTimeout while the body is still arriving: 408, the handler is aborted, rollback', async () => {
    const count = releases(d.scope.name)
    const app = express()
    app.use(scopedSession(d.scope))
    const reasons: string[] = []
    const nextErrors: string[] = []
    const waiting = latch()
    const finished = latch()
    // A handler that does not wait for the body: it is running when the request times out.
    app.post('/slow-upload/:id', async (req, res) => {
      const session = d.scope.getSession()
      session.signal.addEventListener('abort', () =>
        reasons.push((session.signal.reason as Error).message),
      )
      await insert(req.params.id as string)
      waiting.resolve()
      await d.db.query('SELECT pg_sleep(0.6)')
      try {
        await d.db.query('SELECT 1')
      } catch (e) {
        nextErrors.push((e as Error).name)
      }
      finished.resolve()
      res.send('too late')
    })
    // Parsers wait for the body; when it times out they fail, which rolls back just the same.
    app.post('/parsed/:id', async (req, _res, next) => {
      await insert(req.params.id as string)
      waiting.resolve()
      next()
    })
    app.post('/parsed/:id', express.json(), (_req, res) => {
      res.send('never')
    })
    const server = http.createServer(
      { requestTimeout: 300, headersTimeout: 300, connectionsCheckingInterval: 50 },
      app,
    )
    const srv = await listen(app, server)
    const stall = async (path: string) => {
      const req = http.request(`${srv.url}${path}`, {
        method: 'POST',
        agent: false,
        headers: { 'content-type': 'application/json', 'content-length': '1000' },
      })
      const status = new Promise<string>((resolve) => {
        req.on('response', (res) => resolve(`status ${res.statusCode}`))
        req.on('error', (e) => resolve(`error: ${e.message}`))
      })
      req.write('{"a":')
      // ...and never send the rest.
      const result = await status
      req.destroy()
      return result
    }
    try {
      expect(await stall('/slow-upload/request-timeout-1')).toBe('status 408')
      await finished.promise
      await settled(d)
      expect(reasons).toHaveLength(1)
      expect(reasons[0]).toMatch(/ran past its time limit/)
      expect(nextErrors).toEqual(['ScopeAbortedError'])
      expect(count.count).toBe(1)
      expect(await exists('request-timeout-1')).toBe(false)

      expect(await stall('/parsed/request-timeout-2')).toBe('status 408')
      await settled(d)
      expect(count.count).toBe(2)
      expect(await exists('request-timeout-2')).toBe(false)
      expect(await openTransactions(url, d)).toEqual([])
    } finally {
      count.stop()
      await srv.close()
    }
  })
})
