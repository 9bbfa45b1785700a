/**
 * Review probes (session 4) of scopedPool's per-client statement queue
 * (`queues`, `inTurn`, `turnEnded`) against a real PostgreSQL: a statement
 * that fails, a connection that dies under a queue, and what `serial()` does
 * with a function that throws or returns no promise. Comments marked "Was a
 * bug" name what the review found (fixed the same day; each test failed before).
 */
import { AsyncLocalStorage } from 'node:async_hooks'
import { createScope } from '@scoped/core'
import { pgDriver, scopedPool, serial } from '@scoped/pg'
import pg from 'pg'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'

let url: string
let pool: pg.Pool
let scope: ReturnType<typeof createScope<pg.PoolClient>>
const app = `pg_review_s4_${process.pid}`

beforeAll(async () => {
  url = await testDatabase('pg_review_s4')
  await independentQuery(url, 'CREATE TABLE items (id serial PRIMARY KEY, v text NOT NULL)')
  // One connection: every session gets the same pooled client, so a client left wedged shows.
  pool = new pg.Pool({ connectionString: url, application_name: app, max: 1 })
  scope = createScope({
    driver: pgDriver(pool),
    default: false,
    name: 'review-s4',
    acquireTimeoutMs: 2000,
    leakDetectionMs: 0,
  })
})

beforeEach(async () => {
  await independentQuery(url, 'TRUNCATE items')
})

afterAll(async () => {
  await scope.close({ timeoutMs: 1000 })
})

const committed = async () =>
  (await independentQuery(url, 'SELECT v FROM items ORDER BY id')).map((r) => r.v)

/** `p`, or 'timed out' if it has not settled within `ms`. */
function within<T>(p: Promise<T>, ms = 2000): Promise<T | 'timed out'> {
  let timer: NodeJS.Timeout
  return Promise.race([
    p,
    new Promise<'timed out'>((r) => {
      timer = setTimeout(() => r('timed out'), ms)
    }),
  ]).finally(() => clearTimeout(timer))
}

describe('scopedPool: the per-client queue', () => {
  it("a statement failing in the middle of a queue ('none'): the others run in order, the client is free for the next session", async () => {
    const results = await scope.run(
      async () => {
        const db = scopedPool(scope)
        const settled = await Promise.allSettled([
          db.query("INSERT INTO items (v) SELECT 'a' FROM pg_sleep(0.02)"),
          db.query('SELECT * FROM no_such_table'),
          db.query({ text: "INSERT INTO items (v) VALUES ('b')" }),
          db.query("INSERT INTO items (v) VALUES ('c')"),
        ])
        return settled.map((r) => r.status)
      },
      { transaction: 'none' },
    )
    expect(results).toEqual(['fulfilled', 'rejected', 'fulfilled', 'fulfilled'])
    expect(await committed()).toEqual(['a', 'b', 'c'])
    // The same pooled client (max: 1), checked out again: not left waiting for a turn.
    const next = await within(scope.run(() => scopedPool(scope).query('SELECT 1 AS one')))
    expect(next).not.toBe('timed out')
  })

  it("a statement failing in the middle of a queue ('auto'): those behind it fail, the scope rolls back everything, the client is reused clean", async () => {
    const results = await scope
      .run(async () => {
        const db = scopedPool(scope)
        const settled = await Promise.allSettled([
          db.query("INSERT INTO items (v) SELECT 'a' FROM pg_sleep(0.02)"),
          db.query('SELECT * FROM no_such_table'),
          db.query("INSERT INTO items (v) VALUES ('b')"),
        ])
        const statuses = settled.map((r) => r.status)
        throw Object.assign(new Error('handler saw a failure'), { statuses })
      })
      .catch((e: { statuses?: string[] }) => e.statuses)
    expect(results).toEqual(['fulfilled', 'rejected', 'rejected'])
    expect(await committed()).toEqual([])
    // max: 1, so the same client: no transaction left open on it, not left waiting for a turn.
    const next = await within(
      scope.run(() => scopedPool(scope).query("INSERT INTO items (v) VALUES ('next') RETURNING v")),
    )
    expect((next as pg.QueryResult).rows).toEqual([{ v: 'next' }])
    expect(await committed()).toEqual(['next'])
  })

  it('the backend terminated under a queue: every queued statement rejects (none hangs), the next session gets a working connection', async () => {
    const r = await within(
      scope.run(async () => {
        const db = scopedPool(scope)
        const { rows } = await db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
        const queued = Promise.allSettled([
          db.query('SELECT pg_sleep(5)'),
          db.query('SELECT 2'),
          db.query({ text: 'SELECT 3' }),
        ])
        await new Promise((res) => setTimeout(res, 50))
        await independentQuery(url, 'SELECT pg_terminate_backend($1)', [rows[0]!.pid])
        const settled = await queued
        return settled.map((s) => s.status)
      }),
      4000,
    ).catch((e: unknown) => e)
    expect(r).not.toBe('timed out')
    // Whatever the scope's end made of it, each statement settled as a rejection.
    if (Array.isArray(r)) expect(r).toEqual(['rejected', 'rejected', 'rejected'])
    const next = await within(scope.run(() => scopedPool(scope).query('SELECT 1 AS one')))
    expect(next).not.toBe('timed out')
    expect((next as pg.QueryResult).rows).toEqual([{ one: 1 }])
  })

  // Was a bug (new with the rewrite; fixed): serial()'s `start` (scoped-pool.ts, the `run.then(ended, ended)`
  // after `run = fn()`) assumes fn returned a promise. When it did not, `run.then` throws
  // after the client was marked busy and before anything can call turnEnded(): the client stays
  // "busy" in `queues` forever, and every later statement on it — in this session and in every
  // session that checks the pooled client out later — waits for a turn that never comes.
  // Reachable through scopedPool.query(config) with a config object that carries a `callback`
  // (pg then answers through it and returns undefined), which is what pg before
  // brianc/node-postgres#3720 leaves in a config object once it was passed to a callback-style query.
  it('a query config that pg answers through its own callback does not leave the client wedged for later statements', async () => {
    // A pool and scope of its own: a wedged client must not starve the other tests.
    const own = new pg.Pool({ connectionString: url, application_name: app, max: 1 })
    const s = createScope({
      driver: pgDriver(own),
      default: false,
      name: 'review-s4-wedge',
      acquireTimeoutMs: 2000,
      leakDetectionMs: 0,
    })
    try {
      const config = { text: 'SELECT 1', callback: () => {} } as unknown as pg.QueryConfig
      const refused = await s
        .run(() => scopedPool(s).query(config), { transaction: 'none' })
        .catch((e: unknown) => e)
      // Refused like a callback argument, before any checkout.
      expect(refused).toBeInstanceOf(TypeError)
      expect((refused as Error).message).toContain('config.callback')
      expect(s.stats().totals.acquired).toBe(0)
      // The next session gets the same pooled client (max: 1).
      const next = await within(s.run(() => scopedPool(s).query('SELECT 1 AS one')))
      expect(next).not.toBe('timed out')
    } finally {
      // A session stuck on the wedged client is taken by force (destroyed) here.
      await s.close({ timeoutMs: 100 })
    }
  })

  // Was Zalgo (pre-dates the rewrite; fixed): serial() is exported and returns a promise, but
  // when nothing is queued on the client it calls fn at once and lets a synchronous throw out
  // of serial() itself, while the same fn queued behind another statement rejects instead.
  it('serial(): fn throwing synchronously rejects, whether or not the client is busy', async () => {
    await scope.run(
      async () => {
        const client = await scope.getSession().connection()
        const err = new Error('built the statement wrong')
        let p: Promise<unknown> | undefined
        expect(() => {
          p = serial(client, () => {
            throw err
          })
        }).not.toThrow()
        await expect(p).rejects.toBe(err)
      },
      { transaction: 'none' },
    )
  })

  it('serial(): fn that returns no promise rejects with a TypeError naming serial, and the client is free for the next statement', async () => {
    const out = await scope.run(
      async () => {
        const client = await scope.getSession().connection()
        const bad = serial(client, (() => undefined) as unknown as () => Promise<unknown>)
        await expect(bad).rejects.toThrow(
          /serial\(client, fn\): fn must return the statement's promise, got undefined/,
        )
        return (await within(
          serial(client, () => client.query('SELECT 4 AS four')),
        )) as pg.QueryResult
      },
      { transaction: 'none' },
    )
    expect(out.rows).toEqual([{ four: 4 }])
  })

  it('serial(): fn throwing synchronously while the client is busy rejects, and the client is not left busy', async () => {
    const out = await scope.run(
      async () => {
        const client = await scope.getSession().connection()
        const err = new Error('built the statement wrong')
        const first = serial(client, () => client.query('SELECT pg_sleep(0.02)'))
        const bad = serial(client, () => {
          throw err
        })
        const after = serial(client, () => client.query('SELECT 3 AS three'))
        await first
        await expect(bad).rejects.toBe(err)
        return (await within(after)) as pg.QueryResult
      },
      { transaction: 'none' },
    )
    expect(out.rows).toEqual([{ three: 3 }])
  })

  it("a session that waited for the pool's only client runs its fn, BEGIN, statements and COMMIT in its own caller's async context", async () => {
    // pg-pool hands a waiting checkout the client from the previous holder's release(), in that
    // holder's async context: nothing the next session sends may run in it.
    const tag = new AsyncLocalStorage<string>()
    const sent: string[] = []
    const inFn: (string | undefined)[] = []
    const patched = new WeakSet<pg.PoolClient>()
    const onAcquire = (client: pg.PoolClient) => {
      if (patched.has(client)) return
      patched.add(client)
      const query = client.query
      ;(client as any).query = function (this: pg.PoolClient, ...args: any[]) {
        const text = typeof args[0] === 'string' ? args[0] : args[0]?.text
        sent.push(`${tag.getStore()}: ${String(text).split(/[;\s]/)[0]}`)
        return (query as any).apply(this, args)
      }
    }
    pool.on('acquire', onAcquire)
    try {
      const a = tag.run('A', () =>
        scope.run(async () => {
          await scopedPool(scope).query('SELECT 1')
          await new Promise((r) => setTimeout(r, 30))
        }),
      )
      await new Promise((r) => setTimeout(r, 10))
      expect(scope.stats().holding).toBe(1)
      const b = tag.run('B', () =>
        scope.run(async () => {
          await scope.getSession().use(async (c) => {
            inFn.push(tag.getStore())
            return c.query('SELECT 2')
          })
          await scopedPool(scope).query('SELECT 3')
        }),
      )
      await Promise.all([a, b])
    } finally {
      pool.off('acquire', onAcquire)
    }
    expect(inFn).toEqual(['B'])
    const ofB = sent.slice(sent.lastIndexOf('A: COMMIT') + 1)
    expect(ofB.length).toBeGreaterThanOrEqual(4)
    expect(ofB.every((line) => line.startsWith('B: '))).toBe(true)
  })
})
