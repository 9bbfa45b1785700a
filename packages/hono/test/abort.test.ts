/**
 * Client aborts (mid-handler, mid-statement, mid-upload) and timeouts (Hono's
 * timeout() middleware, node's requestTimeout): the unit of work rolls back,
 * the connection stays with the handler until it settles, and is released once.
 * Run for both entry points. Sessions keep their default names
 * (`GET /plain/hold/:id`): the middleware's checkouts are counted per request
 * id, scopedFetch's per name (each test uses its own route).
 */
import { ScopeAbortedError, SessionClosedError } from '@scoped/core'
import { Hono } from 'hono'
import { HTTPException } from 'hono/http-exception'
import { timeout } from 'hono/timeout'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { scopedSession } from '../src/index.ts'
import {
  aborted,
  type Db,
  database,
  deferred,
  entries,
  independentQuery,
  listen,
  type Running,
  rawRequest,
  rowIds,
  settled,
  type Tally,
  until,
} from './support.ts'

// This entry's database and server (each describe.each run sets them in its beforeAll).
let d: Db
let server: Running

const setup = `
  CREATE TABLE items (id text PRIMARY KEY);
  CREATE TABLE counter (id int PRIMARY KEY, n int NOT NULL);
  INSERT INTO counter VALUES (1, 0);
`

/** Hono's default handler, minus the console noise of the errors these tests cause on purpose. */
function quietErrors(app: Hono): void {
  app.onError((err, c) =>
    err instanceof HTTPException ? err.getResponse() : c.text('Internal Server Error', 500),
  )
}

/** What the handler of the current test saw, step by step. */
let probe = newProbe()
function newProbe() {
  return {
    entered: deferred<number>(),
    aborted: deferred(),
    gate: deferred(),
    /** The error of the handler's statement after the abort (or 'no error'). */
    after: deferred<unknown>(),
  }
}

async function backendPid(): Promise<number> {
  return (await d.db.query('SELECT pg_backend_pid() AS pid')).rows[0].pid
}

async function activity(pid: number) {
  const rows = await independentQuery<{
    state: string
    wait_event_type: string | null
    query: string
  }>(d.url, 'SELECT state, wait_event_type, query FROM pg_stat_activity WHERE pid = $1', [pid])
  return rows[0]
}

const sleeping = () =>
  independentQuery(
    d.url,
    "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'SELECT pg_sleep%' AND datname = current_database()",
  )

describe.each(entries)('$title', (m) => {
  /** What a tally counts a request by: its request id (the middleware) or its session's name. */
  const keyOf = (id: string, name: string) => (m.kind === 'middleware' ? id : name)

  beforeAll(async () => {
    d = await database(m.db('abort'), { setup })
    const insert = (id: string) => d.db.query('INSERT INTO items (id) VALUES ($1)', [id])
    const app = new Hono()
    quietErrors(app)
    m.mount(app, d.scope, { path: '/plain/*', routeNames: true })
    m.mount(app, d.scope, { path: '/cancel/*', routeNames: true, cancelOnAbort: true })
    m.mount(app, d.scope, { path: '/timeout/*', routeNames: true })
    // The insert runs before timeout() starts its clock, so the clock only ever
    // runs out on the handler's own wait, whatever the load on the machine.
    app.use('/timeout/*', async (c, next) => {
      await insert(c.req.path.split('/').pop()!)
      probe.entered.resolve(await backendPid())
      await next()
    })
    app.use('/timeout/*', timeout(300))

    // Between statements: waits for the abort, then tries one more statement.
    app.get('/plain/hold/:id', async (c) => {
      const session = d.scope.getSession()
      await insert(c.req.param('id'))
      probe.entered.resolve(await backendPid())
      await aborted(session.signal)
      probe.aborted.resolve()
      await probe.gate.promise
      await d.db.query('SELECT 1').then(() => probe.after.resolve('no error'), probe.after.resolve)
      return c.text('nobody is listening')
    })

    // During a statement: an UPDATE that waits for a row lock the test holds.
    app.get('/:mode{plain|cancel}/locked/:id', async (c) => {
      const session = d.scope.getSession()
      aborted(session.signal).then(() => probe.aborted.resolve())
      await insert(c.req.param('id'))
      probe.entered.resolve(await backendPid())
      try {
        await d.db.query('UPDATE counter SET n = n + 1 WHERE id = 1')
      } catch (e) {
        probe.after.resolve(e)
        throw e
      }
      await d.db.query('SELECT 1').then(() => probe.after.resolve('no error'), probe.after.resolve)
      return c.text('nobody is listening')
    })

    app.get('/cancel/sleep/:id', async (c) => {
      await insert(c.req.param('id'))
      probe.entered.resolve(await backendPid())
      await d.db.query('SELECT pg_sleep(60)').then(
        () => probe.after.resolve('no error'),
        (e) => {
          probe.after.resolve(e)
          throw e
        },
      )
      return c.text('nobody is listening')
    })

    // The handler inserts, then reads a large request body that never fully arrives.
    app.post('/plain/upload/:id', async (c) => {
      await insert(c.req.param('id'))
      probe.entered.resolve(await backendPid())
      try {
        await c.req.arrayBuffer()
      } catch (e) {
        probe.after.resolve(e)
        throw e
      }
      probe.after.resolve('no error')
      return c.text('complete upload')
    })

    app.get('/timeout/sleep/:id', async (c) => {
      await d.db.query('SELECT pg_sleep(60)').then(
        () => probe.after.resolve('no error'),
        (e) => {
          probe.after.resolve(e)
          throw e
        },
      )
      return c.text('too late')
    })

    app.get('/timeout/late/:id', async (c) => {
      await probe.gate.promise // released by the test after the 504 arrived
      await d.db.query('SELECT 1').then(() => probe.after.resolve('no error'), probe.after.resolve)
      return c.text('too late')
    })

    server = await m.listen(app)
  })

  afterAll(async () => {
    await server?.close()
    await d?.close()
  })

  async function expectCleanRollback(id: string, t: Tally, key: string): Promise<void> {
    await settled(d)
    t.stop()
    expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([])
    expect(t.acquiresOf(key)).toBe(1)
    expect(t.releasesOf(key)).toBe(1)
    expect(d.pool.totalCount).toBe(d.pool.idleCount)
    const leaked = await independentQuery(
      d.url,
      "SELECT pid FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' AND datname = current_database()",
    )
    expect(leaked).toEqual([])
  }

  describe('client abort', () => {
    it('mid-handler: the connection stays with the running handler, whose next statement fails with ScopeAbortedError', async () => {
      probe = newProbe()
      const id = 'abort-between'
      const key = keyOf(id, 'GET /plain/hold/:id')
      const t = m.tally(d.scope.name)
      const call = rawRequest(server.port, {
        path: `/plain/hold/${id}`,
        headers: { 'x-test-id': id },
      })
      const pid = await probe.entered.promise
      call.req.destroy()
      await probe.aborted.promise

      // The handler still runs: nothing released, its transaction still open on its backend.
      expect(t.releasesOf(key)).toBe(0)
      expect(d.scope.stats().holding).toBe(1)
      expect((await activity(pid))?.state).toBe('idle in transaction')

      probe.gate.resolve()
      const after = await probe.after.promise
      expect(after).toBeInstanceOf(ScopeAbortedError)
      expect((after as Error).message).toMatch(
        /Session 'GET \/plain\/hold\/:id' was aborted because the client closed the connection/,
      )
      expect('error' in (await call.done)).toBe(true)
      await expectCleanRollback(id, t, key)
    })

    /**
     * A request to `/<mode>/locked/<id>` whose UPDATE waits for a row lock another connection
     * (`locker`) holds, and whose client goes away while it waits: `then` runs from there.
     */
    async function abortWhileLocked(
      mode: 'plain' | 'cancel',
      id: string,
      then: (locker: pg.Client, t: Tally, pid: number) => Promise<void>,
    ): Promise<void> {
      probe = newProbe()
      const locker = new pg.Client({ connectionString: d.url })
      await locker.connect()
      try {
        await locker.query('BEGIN')
        await locker.query('SELECT * FROM counter WHERE id = 1 FOR UPDATE')
        const t = m.tally(d.scope.name)
        const call = rawRequest(server.port, {
          path: `/${mode}/locked/${id}`,
          headers: { 'x-test-id': id },
        })
        const pid = await probe.entered.promise
        await until(
          async () => (await activity(pid))?.wait_event_type === 'Lock',
          'UPDATE waits for the lock',
        )
        call.req.destroy()
        await then(locker, t, pid)
      } finally {
        await locker.end()
      }
    }

    it('mid-statement, without cancelOnAbort: the statement runs on and the connection is released after it', async () => {
      const id = 'abort-during-statement'
      const key = keyOf(id, 'GET /:mode{plain|cancel}/locked/:id')
      await abortWhileLocked('plain', id, async (locker, t, pid) => {
        await probe.aborted.promise

        // Not cancelled: still waiting on the lock, still holding its connection.
        const a = await activity(pid)
        expect(a?.state).toBe('active')
        expect(a?.query).toContain('UPDATE counter')
        expect(t.releasesOf(key)).toBe(0)
        expect(d.scope.stats().holding).toBe(1)

        await locker.query('COMMIT')
        const after = await probe.after.promise
        expect(after).toBeInstanceOf(ScopeAbortedError)
        await expectCleanRollback(id, t, key)
        // The UPDATE that did run was rolled back with the rest.
        expect((await independentQuery(d.url, 'SELECT n FROM counter WHERE id = 1'))[0].n).toBe(0)
      })
    })

    it('mid-statement, with cancelOnAbort: the server stops the statement while the lock is still held', async () => {
      const id = 'abort-cancel-lock'
      const key = keyOf(id, 'GET /:mode{plain|cancel}/locked/:id')
      await abortWhileLocked('cancel', id, async (locker, t) => {
        // The lock is still held by `locker`: only a cancel can end the UPDATE now.
        const after = await probe.after.promise
        expect((after as { code?: string }).code).toBe('57014') // query_canceled
        await locker.query('ROLLBACK')
        await expectCleanRollback(id, t, key)
      })
    })

    it('with cancelOnAbort, a running pg_sleep(60) stops early', async () => {
      probe = newProbe()
      const id = 'abort-cancel-sleep'
      const key = keyOf(id, 'GET /cancel/sleep/:id')
      const t = m.tally(d.scope.name)
      const call = rawRequest(server.port, {
        path: `/cancel/sleep/${id}`,
        headers: { 'x-test-id': id },
      })
      await probe.entered.promise
      await until(async () => (await sleeping()).length === 1, 'pg_sleep running')
      call.req.destroy()
      const after = await probe.after.promise
      expect((after as { code?: string; message?: string }).code).toBe('57014')
      expect((after as Error).message).toContain('canceling statement due to user request')
      expect(await sleeping()).toEqual([])
      await expectCleanRollback(id, t, key)
    })

    it('during a large request-body upload: the body read fails, the unit of work rolls back', async () => {
      probe = newProbe()
      const id = 'abort-upload'
      const key = keyOf(id, 'POST /plain/upload/:id')
      const t = m.tally(d.scope.name)
      const call = rawRequest(server.port, {
        method: 'POST',
        path: `/plain/upload/${id}`,
        headers: {
          'x-test-id': id,
          'content-length': 50 * 1024 * 1024,
          'content-type': 'application/octet-stream',
        },
      })
      const chunk = Buffer.alloc(256 * 1024, 7)
      call.req.write(chunk)
      await probe.entered.promise
      for (let i = 0; i < 4; i++) call.req.write(chunk)
      call.req.destroy()
      const after = await probe.after.promise
      expect(after).toBeInstanceOf(Error)
      await expectCleanRollback(id, t, key)
    })
  })

  describe('timeouts', () => {
    it("hono's timeout(): 504, the handler's running statement is cancelled, one release", async () => {
      probe = newProbe()
      const id = 'timeout-sleep'
      const key = keyOf(id, 'GET /timeout/sleep/:id')
      const t = m.tally(d.scope.name)
      const res = await fetch(`${server.url}/timeout/sleep/${id}`, { headers: { 'x-test-id': id } })
      expect(res.status).toBe(504)
      const after = await probe.after.promise
      expect((after as { code?: string }).code).toBe('57014')
      expect(await sleeping()).toEqual([])
      await expectCleanRollback(id, t, key)
    })

    it("hono's timeout(): the handler that goes on after the 504 cannot touch the closed session", async () => {
      probe = newProbe()
      const id = 'timeout-late'
      const key = keyOf(id, 'GET /timeout/late/:id')
      const t = m.tally(d.scope.name)
      const res = await fetch(`${server.url}/timeout/late/${id}`, { headers: { 'x-test-id': id } })
      expect(res.status).toBe(504)
      await until(() => t.releasesOf(key) === 1, 'released after the 504')
      probe.gate.resolve()
      const after = await probe.after.promise
      expect(after).toBeInstanceOf(SessionClosedError)
      expect((after as Error).message).toMatch(
        /'GET \/timeout\/late\/:id'.*closed when its request ended/,
      )
      await expectCleanRollback(id, t, key)
    })

    // The middleware's own: what runs before it is outside the unit of work.
    if (m.kind === 'middleware')
      it('timeout() mounted before scopedSession(): the 504 goes out, the connection stays with the handler until it settles, then rolls back', async () => {
        const app = new Hono()
        quietErrors(app)
        app.use(timeout(100), scopedSession(d.scope))
        const entered = deferred()
        const gate = deferred()
        const done = deferred()
        app.get('/outer/:id', async (c) => {
          await d.db.query('INSERT INTO items (id) VALUES ($1)', [c.req.param('id')])
          entered.resolve()
          await gate.promise
          done.resolve()
          return c.text('finished late')
        })
        const outer = await listen(app)
        try {
          const id = 'timeout-outside'
          const t = m.tally(d.scope.name)
          const res = await fetch(`${outer.url}/outer/${id}`)
          expect(res.status).toBe(504)
          await entered.promise
          expect(t.releases).toHaveLength(0)
          expect(d.scope.stats().holding).toBe(1)
          gate.resolve()
          await done.promise
          await settled(d)
          t.stop()
          expect(t.releases).toHaveLength(1)
          expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([])
          expect(d.pool.totalCount).toBe(d.pool.idleCount)
        } finally {
          gate.resolve()
          await outer.close()
        }
      })

    it("node's server.requestTimeout on a stalled upload: the body read fails, rollback, one release", async () => {
      const app = new Hono()
      quietErrors(app)
      m.mount(app, d.scope, { routeNames: true })
      const seen = deferred<unknown>()
      app.post('/upload/:id', async (c) => {
        try {
          await d.db.query('INSERT INTO items (id) VALUES ($1)', [c.req.param('id')])
          await c.req.arrayBuffer()
        } catch (e) {
          // The body read fails; or, on a machine slow enough, the INSERT already did.
          seen.resolve(e)
          throw e
        }
        seen.resolve('no error')
        return c.text('complete')
      })
      const slow = await m.listen(app, {
        requestTimeout: 400,
        headersTimeout: 400,
        connectionsCheckingInterval: 50,
      } as never)
      try {
        const id = 'request-timeout'
        const t = m.tally(d.scope.name)
        const call = rawRequest(slow.port, {
          method: 'POST',
          path: `/upload/${id}`,
          headers: { 'content-length': 1024 * 1024 },
        })
        call.req.write(Buffer.alloc(1024, 1)) // then stall: the rest never comes
        const result = await call.done
        expect('error' in result || result.status === 408, JSON.stringify(result)).toBe(true)
        expect(await seen.promise).toBeInstanceOf(Error)
        await settled(d)
        t.stop()
        expect(await rowIds(d.url, 'SELECT id FROM items WHERE id = $1', [id])).toEqual([])
        expect(t.acquires.length).toBeLessThanOrEqual(1)
        expect(t.releases).toHaveLength(t.acquires.length)
        expect(d.pool.totalCount).toBe(d.pool.idleCount)
      } finally {
        await slow.close()
      }
    })
  })
})
