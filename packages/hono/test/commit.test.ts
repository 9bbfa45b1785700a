/**
 * When the unit of work commits, when it rolls back, and that the commit is
 * done before the client has the response. Run for both entry points (each
 * request followed by its `x-test-id`); a failed COMMIT is answered by
 * app.onError in both.
 */

import { Hono } from 'hono'
import { HTTPException } from 'hono/http-exception'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { defaultCommitOn } from '../src/index.ts'
import { type Db, database, entries, type Running, rowIds, settled } from './support.ts'

const setup = `
  CREATE TABLE items (id text PRIMARY KEY);
  CREATE TABLE parents (id int PRIMARY KEY);
  CREATE TABLE children (
    id text PRIMARY KEY,
    parent_id int REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED
  );
`

describe.each(entries)('$title', (m) => {
  let d: Db
  let server: Running
  const handled: unknown[] = []

  beforeAll(async () => {
    d = await database(m.db('commit'), { setup })
    const insert = (id: string) => d.db.query('INSERT INTO items (id) VALUES ($1)', [id])

    const app = new Hono()
    if (m.kind === 'middleware') {
      app.use('/before-throws/*', async () => {
        throw new Error('rejected before the session middleware')
      })
    }
    m.mount(app, d.scope)
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
    app.post('/before-throws/:id', (c) => c.text('never reached'))

    // Set after mounting: scopedFetch()'s wrapper of app.errorHandler must follow it.
    app.onError((err, c) => {
      handled.push(err)
      if (err instanceof HTTPException) return err.getResponse()
      if (err.message.includes('400')) return c.text('bad request', 400)
      return c.text('Internal Server Error', 500)
    })
    server = await m.listen(app)
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
          // The moment the client has the status line: no waiting, no retry.
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
      const t = m.tally(d.scope.name)
      const res = await fetch(`${server.url}/deferred/orphan`, {
        method: 'POST',
        headers: { 'x-test-id': 'orphan' },
      })
      expect(res.status).toBe(500)
      expect(await res.text()).toBe('Internal Server Error')
      // app.onError saw the database's own error, so it can log or map it.
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
      {
        what: 'returned 404 (commits by default)',
        path: 'status-404',
        status: 404,
        committed: true,
      },
      { what: 'thrown HTTPException 409', path: 'http-exception', status: 409, committed: false },
      ...(m.kind === 'fetch'
        ? [
            {
              what: 'thrown Error that onError answers 400',
              path: 'answered-400',
              status: 400,
              committed: false,
            },
          ]
        : []),
      {
        what: m.kind === 'middleware' ? 'error in middleware after ours' : 'error in middleware',
        path: 'mw-throws',
        status: 500,
        committed: false,
      },
    ]
    for (const c of cases) {
      it(`${c.what}: ${c.status}, ${c.committed ? 'committed' : 'rolled back'}`, async () => {
        const id = `case-${c.path}`
        const t = m.tally(d.scope.name)
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

    // The middleware's own: what runs before it is outside the unit of work.
    if (m.kind === 'middleware')
      it('an error in middleware before ours: no scope was opened, nothing checked out', async () => {
        const t = m.tally(d.scope.name)
        const before = d.scope.stats().totals.acquired
        const res = await fetch(`${server.url}/before-throws/x`, {
          method: 'POST',
          headers: { 'x-test-id': 'before' },
        })
        expect(res.status).toBe(500)
        await settled(d)
        t.stop()
        expect(d.scope.stats().totals.acquired).toBe(before)
        expect(t.releases).toHaveLength(0)
      })

    // scopedFetch's own: Hono's notFound runs inside its scope too.
    if (m.kind === 'fetch')
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
      m.mount(app, d.scope, {
        routeNames: true,
        commitOn: ({ status, error }) => !error && status < 400,
      })
      app.post('/:status/:id', async (c) => {
        await d.db.query('INSERT INTO items (id) VALUES ($1)', [c.req.param('id')])
        if (c.req.header('x-throw')) throw new HTTPException(201, { message: 'thrown' })
        return c.text('ok', Number(c.req.param('status')) as 200)
      })
      const strict = await m.listen(app)
      try {
        const call = (status: number, id: string, thrown = false) =>
          fetch(`${strict.url}/${status}/${id}`, {
            method: 'POST',
            headers: thrown ? { 'x-throw': '1' } : {},
          }).then((r) => r.status)
        expect(await call(200, 'strict-200')).toBe(200)
        expect(await call(404, 'strict-404')).toBe(404)
        // Even a thrown exception whose response is a 2xx rolls back.
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
      m.mount(app, d.scope, {
        routeNames: true,
        commitOn: (o) =>
          (o.error as HTTPException | undefined)?.status === 409 || defaultCommitOn(o),
      })
      app.post('/:id/:status', async (c) => {
        await d.db.query('INSERT INTO items (id) VALUES ($1)', [c.req.param('id')])
        throw new HTTPException(Number(c.req.param('status')) as 409, { message: 'thrown' })
      })
      const s = await m.listen(app)
      try {
        expect((await fetch(`${s.url}/kept-409/409`, { method: 'POST' })).status).toBe(409)
        expect((await fetch(`${s.url}/gone-400/400`, { method: 'POST' })).status).toBe(400)
        await settled(d)
        expect(
          await rowIds(d.url, "SELECT id FROM items WHERE id IN ('kept-409', 'gone-400')"),
        ).toEqual(['kept-409'])
        expect(d.pool.totalCount).toBe(d.pool.idleCount)
      } finally {
        await s.close()
      }
    })
  })
})
