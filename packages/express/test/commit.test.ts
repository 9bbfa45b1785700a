/**
 * When the unit of work commits, and that the client never sees a response
 * whose COMMIT did not happen: rows checked from an independent connection.
 */
import { stat } from 'node:fs/promises'
import net from 'node:net'
import { fileURLToPath } from 'node:url'
import { defaultCommitOn, scopedSession } from '@scoped/express'
import express, { type NextFunction, type Request, type Response } from 'express'
import pg from 'pg'
import { afterAll, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest'
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
let reported: { during: string; error: unknown }[] = []
let observer: pg.Client

beforeAll(async () => {
  url = await testDatabase('express_commit')
  await independentQuery(
    url,
    `CREATE TABLE items (id text PRIMARY KEY);
     CREATE TABLE parent (id int PRIMARY KEY);
     CREATE TABLE child (id text PRIMARY KEY,
       parent_id int REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)`,
  )
  d = makeDb(url, 'express_commit', {
    onError: (error, { during }) => reported.push({ during, error }),
  })
  // An independent connection, outside the pool under test, to look at committed rows.
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
/** Succeeds now, fails at COMMIT: the parent does not exist and the check is deferred. */
const insertOrphan = (id: string) =>
  d.db.query('INSERT INTO child (id, parent_id) VALUES ($1, 999)', [id])
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

describe('COMMIT before the response', () => {
  it('a row inserted by a 200 is visible from another connection the moment the client has the response (200 times)', async () => {
    const app = express()
    app.use(scopedSession(d.scope))
    app.post('/items/:id', async (req, res) => {
      await insert(req.params.id as string)
      res.json({ ok: true })
    })
    const srv = await listen(app)
    try {
      for (let i = 0; i < 200; i++) {
        const id = `visible-${i}`
        const res = await fetch(`${srv.url}/items/${id}`, { method: 'POST' })
        expect(res.status).toBe(200)
        // Checked before the body is even read: the status line came after the COMMIT.
        expect(await exists('items', id), id).toBe(true)
        await res.arrayBuffer()
      }
    } finally {
      await srv.close()
    }
    await settled(d)
    expect(await openTransactions(url, d)).toEqual([])
  })

  it('a COMMIT that fails (deferred constraint) becomes a 500 without the handler’s headers, and the row is absent', async () => {
    const count = releases(d.scope.name)
    const app = express()
    app.use(scopedSession(d.scope))
    app.post('/orphans/:id', async (req, res) => {
      await insertOrphan(req.params.id as string)
      res.cookie('order', req.params.id as string)
      res.setHeader('X-Trace', 'kept')
      res.status(201).json({ created: req.params.id })
    })
    const srv = await listen(app)
    try {
      const res = await fetch(`${srv.url}/orphans/o-1`, { method: 'POST' })
      expect(res.status).toBe(500)
      expect(await res.text()).toBe('Internal Server Error')
      expect(res.headers.get('content-type')).toBe('text/plain; charset=utf-8')
      expect(res.headers.get('set-cookie')).toBeNull()
      expect(res.headers.get('x-trace')).toBe('kept')
      expect(await exists('child', 'o-1')).toBe(false)
      await settled(d)
      expect(count.count).toBe(1)
      expect(reported).toHaveLength(1)
      expect(reported[0]!.during).toMatch(/COMMIT of 'POST \/orphans\/:id' before its response/)
      expect((reported[0]!.error as { code?: string }).code).toBe('23503')
    } finally {
      count.stop()
      await srv.close()
    }
  })

  it('after res.writeHead() a failed COMMIT cuts the connection: the client never gets a clean response', async () => {
    const app = express()
    app.use(scopedSession(d.scope))
    app.post('/orphans/:id', async (req, res) => {
      await insertOrphan(req.params.id as string)
      res.writeHead(201, { 'content-type': 'application/json' })
      res.end(JSON.stringify({ created: req.params.id }))
    })
    const srv = await listen(app)
    try {
      const r = await rawRequest(srv.url, '/orphans/o-2', { method: 'POST' })
      expect(r.ended).toBe('error')
      expect(r.body).toBe('')
      expect(await exists('child', 'o-2')).toBe(false)
    } finally {
      await srv.close()
    }
    await settled(d)
  })
})

describe('requests sharing one connection', () => {
  it('pipelined requests and the keep-alive request after them each commit or roll back their own unit of work', async () => {
    const app = express()
    app.use(scopedSession(d.scope))
    const heard: string[] = []
    app.get('/pipe/:id', async (req, res) => {
      const id = req.params.id as string
      // The first answers last of its own work: the second is routed while it still runs.
      if (id.includes('-slow')) await new Promise((r) => setTimeout(r, 50))
      await insert(id)
      if (id.includes('-listened')) {
        const mine = d.scope.getSession().id
        res.on('finish', () => {
          try {
            heard.push(`${id}: ${d.scope.getSession().id === mine ? 'its own session' : 'another'}`)
          } catch (e) {
            heard.push(`${id}: ${e}`)
          }
        })
      }
      if (id.includes('-fail')) return void res.status(500).send(id)
      res.send(id)
    })
    const srv = await listen(app)
    const r = releases(d.scope.name)
    try {
      const ids = ['p-slow-listened', 'p-listened', 'p-fail', 'p-last-listened']
      const socket = net.connect(Number(new URL(srv.url).port), '127.0.0.1')
      let text = ''
      socket.setEncoding('utf8')
      socket.on('data', (chunk: string) => {
        text += chunk
      })
      const get = (id: string) => `GET /pipe/${id} HTTP/1.1\r\nHost: x\r\n\r\n`
      // Three requests in one write (pipelined), then one more once they were answered.
      socket.write(ids.slice(0, 3).map(get).join(''))
      await vi.waitFor(() => expect(text.endsWith('\r\n\r\np-fail')).toBe(true))
      socket.write(get('p-last-listened'))
      await vi.waitFor(() => expect(text.endsWith('\r\n\r\np-last-listened')).toBe(true))
      socket.destroy()
      const statuses = [...text.matchAll(/HTTP\/1\.1 (\d+)/g)].map((m) => Number(m[1]))
      expect(statuses).toEqual([200, 200, 500, 200])
      // Responses in request order, each with its own body.
      expect([...text.matchAll(/\r\n\r\n(p-[a-z-]+)/g)].map((m) => m[1])).toEqual(ids)
      await settled(d)
      expect(r.count).toBe(4)
      // Their listeners ran inside their own scopes, whatever the socket held by then.
      expect(heard).toEqual(
        ['p-slow-listened', 'p-listened', 'p-last-listened'].map((id) => `${id}: its own session`),
      )
      expect(await exists('items', 'p-slow-listened')).toBe(true)
      expect(await exists('items', 'p-listened')).toBe(true)
      expect(await exists('items', 'p-fail')).toBe(false)
      expect(await exists('items', 'p-last-listened')).toBe(true)
    } finally {
      r.stop()
      await srv.close()
    }
  })
})

describe('commit or rollback, by outcome: exactly one release each', () => {
  class Expected extends Error {
    status = 400
  }
  const cases: {
    kind: string
    status: number
    committed: boolean
  }[] = [
    { kind: 'ok', status: 200, committed: true },
    { kind: 'returned-404', status: 404, committed: true },
    { kind: 'returned-500', status: 500, committed: false },
    { kind: 'returned-503', status: 503, committed: false },
    { kind: 'throw', status: 500, committed: false },
    { kind: 'sync-throw', status: 500, committed: false },
    { kind: 'sync-throw-string', status: 500, committed: false },
    { kind: 'throw-async', status: 500, committed: false },
    { kind: 'throw-string', status: 500, committed: false },
    { kind: 'reject-number', status: 500, committed: false },
    { kind: 'thrown-400', status: 400, committed: false },
    { kind: 'next-error', status: 500, committed: false },
    { kind: 'recovered', status: 200, committed: false },
    { kind: 'middleware-error', status: 500, committed: false },
    { kind: 'parser-error', status: 400, committed: false },
    { kind: 'rollback-only', status: 200, committed: false },
  ]

  let srv: Server
  beforeAll(async () => {
    const app = express()
    app.use(scopedSession(d.scope))
    // Kinds whose write happens in a middleware (after the session's), before what fails.
    const early = new Set(['middleware-error', 'parser-error', 'sync-throw', 'sync-throw-string'])
    app.use('/case/:kind/:id', async (req, _res, next) => {
      const kind = req.params.kind as string
      if (early.has(kind)) {
        await insert(req.params.id as string)
        if (kind === 'middleware-error') return next(new Error('middleware failed'))
      }
      next()
    })
    app.use(express.json())
    // A synchronous handler: its throw is caught by Express's router, not a promise.
    app.post('/case/:kind/:id', (req: Request, _res: Response, next: NextFunction) => {
      if (req.params.kind === 'sync-throw') throw new Error('sync failure')
      if (req.params.kind === 'sync-throw-string') throw 'a sync string'
      next()
    })
    app.post('/case/:kind/:id', async (req: Request, res: Response, next: NextFunction) => {
      const { kind, id } = req.params as { kind: string; id: string }
      if (!early.has(kind)) await insert(id)
      switch (kind) {
        case 'ok':
          return void res.json({ ok: true })
        case 'returned-404':
          return void res.status(404).json({ missing: true })
        case 'returned-500':
          return void res.status(500).json({ failed: true })
        case 'returned-503':
          return void res.sendStatus(503)
        case 'throw-async':
          await sleep(1)
          throw new Error('async failure')
        case 'throw-string':
          throw 'a string, not an Error'
        case 'reject-number':
          return Promise.reject(42)
        case 'thrown-400':
          throw new Expected('bad input')
        case 'next-error':
          return next(new Error('passed to next'))
        case 'recovered':
          throw Object.assign(new Error('recover me'), { recover: true })
        case 'rollback-only':
          d.scope.getSession().setRollbackOnly()
          return void res.json({ ok: 'but rolled back' })
        default:
          throw new Error('sync failure')
      }
    })
    app.use((err: unknown, _req: Request, res: Response, _next: NextFunction) => {
      const e = err as { status?: number; recover?: boolean } | null
      if (e && typeof e === 'object' && e.recover) return void res.json({ recovered: true })
      res.status(e && typeof e === 'object' && e.status ? e.status : 500).send('error')
    })
    srv = await listen(app)
  })
  afterAll(async () => {
    await srv.close()
  })

  it.each(cases)('$kind → $status, committed: $committed', async ({ kind, status, committed }) => {
    const count = releases(d.scope.name)
    try {
      const id = `case-${kind}`
      const res = await fetch(`${srv.url}/case/${kind}/${id}`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: kind === 'parser-error' ? '{"not json' : '{}',
      })
      expect(res.status).toBe(status)
      await res.arrayBuffer()
      await settled(d)
      expect(await exists('items', id)).toBe(committed)
      expect(count.count).toBe(1)
      expect(await openTransactions(url, d)).toEqual([])
    } finally {
      count.stop()
    }
  })

  it('an error in a middleware before scopedSession() opens nothing', async () => {
    const count = releases(d.scope.name)
    const app = express()
    app.use((_req, _res, next) => next(new Error('auth failed')))
    app.use(scopedSession(d.scope))
    let reached = false
    app.get('/', (_req, res) => {
      reached = true
      res.send('never')
    })
    const s = await listen(app)
    try {
      expect((await fetch(s.url)).status).toBe(500)
      await settled(d)
      expect(reached).toBe(false)
      expect(count.count).toBe(0)
    } finally {
      count.stop()
      await s.close()
    }
  })

  it('commitOn decides for responses nothing was thrown for', async () => {
    const app = express()
    app.use(scopedSession(d.scope, { commitOn: ({ status }) => status < 400 }))
    app.post('/:status/:id', async (req, res) => {
      await insert(req.params.id as string)
      res.sendStatus(Number(req.params.status))
    })
    const s = await listen(app)
    try {
      expect((await fetch(`${s.url}/404/commit-on-404`, { method: 'POST' })).status).toBe(404)
      expect((await fetch(`${s.url}/302/commit-on-302`, { method: 'POST' })).status).toBe(302)
      await settled(d)
      expect(await exists('items', 'commit-on-404')).toBe(false)
      expect(await exists('items', 'commit-on-302')).toBe(true)
    } finally {
      await s.close()
    }
  })

  it('commitOn sees the thrown error: composed with defaultCommitOn, an expected one can commit', async () => {
    class Conflict extends Error {
      status = 409
    }
    const seen: unknown[] = []
    const app = express()
    app.use(
      scopedSession(d.scope, {
        commitOn: (o) => {
          seen.push(o.error)
          return defaultCommitOn(o) || o.error instanceof Conflict
        },
      }),
    )
    app.post('/:kind/:id', async (req) => {
      await insert(req.params.id as string)
      throw req.params.kind === 'conflict' ? new Conflict('taken') : 'plain failure'
    })
    app.use((err: unknown, _req: Request, res: Response, _next: NextFunction) => {
      res.status(err instanceof Conflict ? 409 : 400).send('error')
    })
    const s = await listen(app)
    try {
      expect((await fetch(`${s.url}/conflict/conflict-commits`, { method: 'POST' })).status).toBe(
        409,
      )
      expect((await fetch(`${s.url}/other/other-rolls-back`, { method: 'POST' })).status).toBe(400)
      await settled(d)
      expect(await exists('items', 'conflict-commits')).toBe(true)
      expect(await exists('items', 'other-rolls-back')).toBe(false)
      expect(seen[0]).toBeInstanceOf(Conflict)
      expect(seen[1]).toBe('plain failure')
    } finally {
      await s.close()
    }
  })

  it('a commitOn that throws rolls back and answers 500, and the error is reported', async () => {
    const app = express()
    app.use(
      scopedSession(d.scope, {
        commitOn: () => {
          throw new Error('commitOn bug')
        },
      }),
    )
    app.post('/:id', async (req, res) => {
      await insert(req.params.id as string)
      res.json({ ok: true })
    })
    const s = await listen(app)
    try {
      const res = await fetch(`${s.url}/commit-on-throws`, { method: 'POST' })
      expect(res.status).toBe(500)
      await settled(d)
      expect(await exists('items', 'commit-on-throws')).toBe(false)
      expect(reported.map((r) => r.during)).toEqual(['scopedSession({ commitOn })'])
    } finally {
      await s.close()
    }
  })
})

describe('a body written after the handler returned (res.write)', () => {
  it('keeps its session until res.end(), then commits', async () => {
    const count = releases(d.scope.name)
    const app = express()
    app.use(scopedSession(d.scope))
    const firstChunkSeen = latch()
    app.get('/stream/:id', (req, res) => {
      const id = req.params.id as string
      const session = d.scope.getSession()
      res.setHeader('content-type', 'text/plain')
      res.write('a')
      // The handler returns now; the body goes on in a detached async function.
      void (async () => {
        await insert(`${id}-1`)
        res.write('b')
        await firstChunkSeen.promise
        await insert(`${id}-2`)
        res.end(session === d.scope.getSession() ? 'c' : 'X')
      })()
    })
    const srv = await listen(app)
    try {
      const res = await fetch(`${srv.url}/stream/s1`)
      expect(res.status).toBe(200)
      const reader = res.body!.getReader()
      const decoder = new TextDecoder()
      let body = ''
      while (!body.includes('b')) {
        const { value } = await reader.read()
        body += decoder.decode(value)
      }
      // Mid-body: the session holds its connection, and nothing is committed yet.
      expect(d.scope.stats().holding).toBe(1)
      expect(d.scope.stats().inTransaction).toBe(1)
      expect(await exists('items', 's1-1')).toBe(false)
      firstChunkSeen.resolve()
      for (;;) {
        const { value, done } = await reader.read()
        if (done) break
        body += decoder.decode(value)
      }
      expect(body).toBe('abc')
      expect(await exists('items', 's1-1')).toBe(true)
      expect(await exists('items', 's1-2')).toBe(true)
      await settled(d)
      expect(count.count).toBe(1)
    } finally {
      count.stop()
      await srv.close()
    }
  })

  it('res.sendFile() (a piped file with a Content-Length) commits before its last bytes go out', async () => {
    const file = fileURLToPath(import.meta.url) // any file: this one
    const size = (await stat(file)).size
    const app = express()
    app.use(scopedSession(d.scope))
    app.get('/file/:id', async (req, res, next) => {
      await insert(req.params.id as string)
      res.sendFile(file, (err) => err && next(err))
    })
    const srv = await listen(app)
    try {
      const res = await fetch(`${srv.url}/file/sent-file`)
      expect(res.status).toBe(200)
      expect((await res.arrayBuffer()).byteLength).toBe(size)
      expect(await exists('items', 'sent-file')).toBe(true)
    } finally {
      await srv.close()
    }
    await settled(d)
  })

  it('a failed COMMIT at the end of a chunked body cuts the response off', async () => {
    const app = express()
    app.use(scopedSession(d.scope))
    app.get('/stream/:id', async (req, res) => {
      res.write('part one;')
      await insertOrphan(req.params.id as string)
      await sleep(5)
      res.write('part two;')
      res.end('the end')
    })
    const srv = await listen(app)
    try {
      const r = await rawRequest(srv.url, '/stream/chunked-fail')
      expect(r.status).toBe(200)
      expect(r.ended).toBe('error')
      expect(r.body).not.toContain('the end')
      expect(await exists('child', 'chunked-fail')).toBe(false)
      await settled(d)
      expect(reported).toHaveLength(1)
      expect(reported[0]!.during).toMatch(/after its response began \(the response was cut off\)/)
    } finally {
      await srv.close()
    }
  })

  it('with a Content-Length, the write that completes the body waits for the COMMIT', async () => {
    const app = express()
    app.use(scopedSession(d.scope))
    app.get('/sized/:parent/:id', async (req, res) => {
      res.setHeader('content-length', '10')
      res.write('12345')
      await d.db.query('INSERT INTO child (id, parent_id) VALUES ($1, $2)', [
        req.params.id,
        Number(req.params.parent),
      ])
      res.write('67890') // all ten bytes: a client could take this as the whole response
      await sleep(20)
      res.end()
    })
    await independentQuery(url, 'INSERT INTO parent (id) VALUES (1)')
    const srv = await listen(app)
    try {
      const bad = await rawRequest(srv.url, '/sized/999/sized-fail')
      expect(bad.status).toBe(200)
      expect(bad.ended).toBe('error')
      expect(bad.body).toBe('12345')
      expect(await exists('child', 'sized-fail')).toBe(false)

      const good = await rawRequest(srv.url, '/sized/1/sized-ok')
      expect(good).toMatchObject({ status: 200, ended: 'complete', body: '1234567890' })
      expect(await exists('child', 'sized-ok')).toBe(true)
    } finally {
      await srv.close()
    }
    await settled(d)
  })
})
