/**
 * scopedPool(scope): code written against pool.query() joins the current
 * scope's unit of work. Against a real PostgreSQL: every query of a scope runs
 * on one backend, in one transaction that a throw rolls back; outside a scope
 * it is an error that says how to fix it, or (opted in) plain pool.query().
 */
import { AsyncLocalStorage } from 'node:async_hooks'
import { createScope, NoActiveScopeError, SessionClosedError } from '@scoped/core'
import { pgDriver, scopedPool, serial } from '@scoped/pg'
import pg from 'pg'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { backends, independentQuery, testDatabase } from '../../../test/support/db.ts'

let url: string
let pool: pg.Pool
let scope: ReturnType<typeof createScope<pg.PoolClient>>
const app = `pg_scoped_pool_${process.pid}`

beforeAll(async () => {
  url = await testDatabase('pg_scoped_pool')
  await independentQuery(url, 'CREATE TABLE items (id serial PRIMARY KEY, v text NOT NULL)')
  pool = new pg.Pool({ connectionString: url, application_name: app, max: 3 })
  scope = createScope({ driver: pgDriver(pool), default: false, name: 'scoped-pool' })
})

beforeEach(async () => {
  await independentQuery(url, 'TRUNCATE items')
})

afterAll(async () => {
  await scope.close()
})

const committed = async () =>
  (await independentQuery(url, 'SELECT v FROM items ORDER BY id')).map((r) => r.v)

const settled = async () => {
  expect(pool.totalCount).toBe(pool.idleCount)
  const left = await backends(url, app)
  expect(left.filter((b) => b.state.startsWith('idle in transaction'))).toEqual([])
}

/**
 * In a `'none'` scope that already holds its connection: `fn` with the client's
 * `query` replaced by `wrap(original)`, which is put back afterwards.
 */
async function onHeldClient(
  wrap: (query: (...args: any[]) => any) => (this: pg.PoolClient, ...args: any[]) => any,
  fn: (pool: ReturnType<typeof scopedPool>, client: pg.PoolClient) => Promise<unknown>,
): Promise<void> {
  await scope.run(
    async () => {
      const pool = scopedPool(scope)
      await pool.query('SELECT 1') // the connection is held from here on
      const client = await scope.getSession().connection()
      const query = client.query
      ;(client as any).query = wrap(query as any)
      try {
        await fn(pool, client)
      } finally {
        ;(client as any).query = query
      }
    },
    { transaction: 'none' },
  )
}

describe('scopedPool.query()', () => {
  const db = () => scopedPool(scope)

  it('runs every query of a scope on the same backend, concurrent ones included', async () => {
    const pids = await scope.run(async () => {
      const pool = db()
      const first = await pool.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
      const more = await Promise.all(
        Array.from({ length: 5 }, () =>
          pool.query<{ pid: number }>('SELECT pg_backend_pid() AS pid'),
        ),
      )
      return [first, ...more].map((r) => r.rows[0]!.pid)
    })
    expect(new Set(pids).size).toBe(1)
    expect(scope.stats().totals.acquired).toBe(1)
    await settled()
  })

  it('keeps the order of queries issued without awaiting, and commits them together', async () => {
    await scope.run(async () => {
      const pool = db()
      await Promise.all(
        ['a', 'b', 'c', 'd'].map((v) => pool.query('INSERT INTO items (v) VALUES ($1)', [v])),
      )
    })
    expect(await committed()).toEqual(['a', 'b', 'c', 'd'])
  })

  it('sends statements issued at once one at a time, in call order, sharing the turn with serial()', async () => {
    // pg deprecates calling client.query() while the client runs a query (removed in pg@9):
    // count the statements on the wire at once.
    let onWire = 0
    let most = 0
    const ended = () => void onWire--
    await onHeldClient(
      (query) =>
        function (this: pg.PoolClient, ...args: any[]) {
          most = Math.max(most, ++onWire)
          const callback = typeof args.at(-1) === 'function' ? args.pop() : undefined
          if (callback) {
            return query.call(this, ...args, (e: unknown, r: unknown) => {
              ended()
              callback(e, r)
            })
          }
          const sent = query.apply(this, args) as Promise<unknown>
          sent.then(ended, ended)
          return sent
        },
      (pool, client) =>
        Promise.all([
          pool.query("INSERT INTO items (v) SELECT 'slow' FROM pg_sleep(0.05)"),
          pool.query("INSERT INTO items (v) VALUES ('fast 1')"),
          serial(client, () => client.query("INSERT INTO items (v) VALUES ('serial')")),
          pool.query("INSERT INTO items (v) VALUES ('fast 2')"),
        ]),
    )
    expect(await committed()).toEqual(['slow', 'fast 1', 'serial', 'fast 2'])
    expect(most).toBe(1)
    await settled()
  })

  it("a statement that waited for its turn is sent in its caller's async context (AsyncLocalStorage, tracing)", async () => {
    // Instrumentation (OpenTelemetry's pg spans, request-id loggers) reads the async context
    // when client.query() is called: a queued statement must not be sent from the previous
    // statement's callback, in the context of whatever the connection's socket was made in.
    const tag = new AsyncLocalStorage<string>()
    const seen: (string | undefined)[] = []
    await onHeldClient(
      (query) =>
        function (this: pg.PoolClient, ...args: any[]) {
          seen.push(tag.getStore())
          return query.apply(this, args)
        },
      (pool, client) =>
        Promise.all([
          tag.run('first', () => pool.query('SELECT pg_sleep(0.02)')),
          tag.run('second', () => pool.query('SELECT 2')),
          tag.run('third', () => serial(client, () => client.query('SELECT 3'))),
          tag.run('fourth', () => pool.query({ text: 'SELECT 4' })),
        ]),
    )
    expect(seen).toEqual(['first', 'second', 'third', 'fourth'])
  })

  it('refuses pg-cursor / pg-query-stream objects before checking out, saying what to use instead', async () => {
    const acquired = scope.stats().totals.acquired
    const cursorLike = { submit() {}, text: 'SELECT 1' }
    const err = await scope.run(() => db().query(cursorLike as any)).catch((e: unknown) => e)
    expect(err).toBeInstanceOf(TypeError)
    expect((err as Error).message).toContain('pg-cursor and pg-query-stream')
    expect((err as Error).message).toContain('getSession().use(')
    expect(scope.stats().totals.acquired).toBe(acquired)
  })

  it('rolls every row of the scope back when it throws', async () => {
    const run = scope.run(async () => {
      const pool = db()
      await pool.query("INSERT INTO items (v) VALUES ('one')")
      await pool.query({ text: 'INSERT INTO items (v) VALUES ($1)', values: ['two'] })
      // Visible inside the unit of work...
      expect((await pool.query('SELECT count(*)::int AS n FROM items')).rows[0].n).toBe(2)
      throw new Error('handler failed')
    })
    await expect(run).rejects.toThrow('handler failed')
    // ...and gone after it.
    expect(await committed()).toEqual([])
    await settled()
  })

  it('a failing query rejects with the PostgreSQL error and rolls the scope back', async () => {
    const run = scope.run(async () => {
      await db().query("INSERT INTO items (v) VALUES ('before')")
      await db().query('INSERT INTO items (v) VALUES (NULL)')
    })
    await expect(run).rejects.toMatchObject({ code: '23502' })
    expect(await committed()).toEqual([])
    await settled()
  })

  it("with transaction: 'none' each query autocommits on the session's one connection", async () => {
    const run = scope.run(
      async () => {
        await db().query("INSERT INTO items (v) VALUES ('autocommitted')")
        throw new Error('too late to undo')
      },
      { transaction: 'none' },
    )
    await expect(run).rejects.toThrow('too late to undo')
    expect(await committed()).toEqual(['autocommitted'])
  })

  it('outside a scope it throws NoActiveScopeError with the fix, and opens nothing', async () => {
    const acquired = scope.stats().totals.acquired
    const err = await db()
      .query('SELECT 1')
      .catch((e) => e)
    expect(err).toBeInstanceOf(NoActiveScopeError)
    expect(err.message).toContain('scopedPool.query()')
    expect(err.message).toContain("'scoped-pool'")
    expect(err.message).toContain('Fix:')
    expect(err.message).toMatch(/runJob|middleware/)
    expect(scope.stats().totals.acquired).toBe(acquired)
  })

  it("outside a scope with outsideScope: 'pool' it is plain pool.query() (autocommit)", async () => {
    const fallback = scopedPool(scope, { outsideScope: 'pool', pool })
    const r = await fallback.query("INSERT INTO items (v) VALUES ('direct') RETURNING v")
    expect(r.rows).toEqual([{ v: 'direct' }])
    expect(await committed()).toEqual(['direct'])
    // Inside a scope the same object still routes to the session.
    const run = scope.run(async () => {
      await fallback.query("INSERT INTO items (v) VALUES ('scoped')")
      throw new Error('undo')
    })
    await expect(run).rejects.toThrow('undo')
    expect(await committed()).toEqual(['direct'])
    await settled()
  })

  it("work that outlives its scope fails loudly, even with outsideScope: 'pool'", async () => {
    const fallback = scopedPool(scope, { outsideScope: 'pool', pool })
    let late: Promise<unknown> | undefined
    await scope.run(
      async () => {
        await fallback.query('SELECT 1')
        late = new Promise((r) => setTimeout(r, 20)).then(() =>
          fallback.query("INSERT INTO items (v) VALUES ('orphan')"),
        )
      },
      { name: 'POST /items' },
    )
    const err = (await late!.catch((e: unknown) => e)) as SessionClosedError
    expect(err).toBeInstanceOf(SessionClosedError)
    expect(err.message).toContain("'POST /items'")
    expect(await committed()).toEqual([])
  })

  it('refuses callbacks', async () => {
    const err = await scope
      .run(() => (db().query as any)('SELECT 1', [], () => {}))
      .catch((e: unknown) => e)
    expect(err).toBeInstanceOf(TypeError)
    expect((err as Error).message).toContain('callbacks are not supported')
  })
})
