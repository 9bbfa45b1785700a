/**
 * Review probes (session 6): sentences of packages/core/README.md and
 * packages/pg/README.md that no earlier test pinned against a real
 * PostgreSQL — remove() and an explicit commit() in the middle of a request,
 * a savepoint whose fn caught a statement's error, a real deadlock (40P01)
 * under transaction(fn, { retry }), a backend ended by
 * idle_in_transaction_session_timeout (25P03), a raw BEGIN under
 * release: 'idle', and a fire-and-forget finally that outlives its scope.
 * Each asserts what a user checks: committed rows, the pool, pg_stat_activity.
 */
import { createScope, type Scope, SessionClosedError, TransactionStateError } from '@scoped/core'
import { pgDriver, scopedPool } from '@scoped/pg'
import pg from 'pg'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { backends, independentQuery, testDatabase } from '../../../test/support/db.ts'

let url: string
const app = `pg_review_s6_${process.pid}`
const toClose: Scope<pg.PoolClient>[] = []

beforeAll(async () => {
  url = await testDatabase('pg_review_s6')
  await independentQuery(
    url,
    `CREATE TABLE items (id serial PRIMARY KEY, v text NOT NULL UNIQUE);
     CREATE TABLE locks (id int PRIMARY KEY, n int NOT NULL);
     INSERT INTO locks VALUES (1, 0), (2, 0);`,
  )
})

beforeEach(async () => {
  await independentQuery(url, 'TRUNCATE items; UPDATE locks SET n = 0')
})

afterAll(async () => {
  await Promise.all(toClose.map((s) => s.close({ timeoutMs: 1000 })))
})

let n = 0
function setup(opts: { max?: number; scope?: Record<string, unknown>; pool?: pg.PoolConfig } = {}) {
  const name = `${app}_${++n}`
  const pool = new pg.Pool({
    connectionString: url,
    application_name: name,
    max: opts.max ?? 2,
    ...opts.pool,
  })
  const poolErrors: Error[] = []
  pool.on('error', (e) => poolErrors.push(e))
  const scope = createScope({
    driver: pgDriver(pool, { onIdleError: () => {} }),
    default: false,
    name: 'review-s6',
    acquireTimeoutMs: 5000,
    leakDetectionMs: 0,
    onError: () => {},
    ...opts.scope,
  })
  toClose.push(scope)
  const db = scopedPool(scope)
  const idle = async () => ({
    checkedOut: pool.totalCount - pool.idleCount,
    idleInTransaction: (await backends(url, name)).filter((b) =>
      b.state?.startsWith('idle in transaction'),
    ).length,
  })
  return { pool, scope, db, name, idle, poolErrors }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

async function waitFor(what: string, check: () => Promise<boolean> | boolean, ms = 5000) {
  const until = Date.now() + ms
  while (!(await check())) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`)
    await sleep(10)
  }
}

const items = async () =>
  (await independentQuery(url, 'SELECT v FROM items ORDER BY id')).map((r) => r.v as string)

const pidQuery = 'SELECT pg_backend_pid() AS pid'

describe('remove() in the middle of a request', () => {
  // core README: "`remove()` rolls back what is not committed, as SQLAlchemy's
  // `Session.close()` does" and "From the moment `remove()` is called, `getSession()` opens a
  // new session".
  it('remove() then more work in the same run: the work before is rolled back, the work after commits', async () => {
    const { scope, db, idle } = setup()
    await scope.run(async () => {
      await db.query("INSERT INTO items (v) VALUES ('before remove')")
      await scope.remove()
      await db.query("INSERT INTO items (v) VALUES ('after remove')")
    })
    expect(await items()).toEqual(['after remove'])
    expect(await idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
    expect(scope.stats()).toMatchObject({ open: 0, holding: 0 })
  })

  // core README: "call `commit()` first to keep the work."
  it('commit() then remove(): the committed work stays', async () => {
    const { scope, db, idle } = setup()
    await scope.run(async () => {
      await db.query("INSERT INTO items (v) VALUES ('kept')")
      await scope.getSession().commit()
      await db.query("INSERT INTO items (v) VALUES ('dropped')")
      await scope.remove()
    })
    expect(await items()).toEqual(['kept'])
    expect(await idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  })

  // core README: "It waits for uses still running (the connection is never released under a
  // statement)".
  it('remove() not awaited while a statement runs: the statement completes, then its work is rolled back', async () => {
    const { scope, db, idle } = setup()
    let result: unknown
    await scope.run(async () => {
      await db.query("INSERT INTO items (v) VALUES ('under remove')")
      const running = db.query('SELECT pg_sleep(0.2), 1 AS one')
      await sleep(20)
      const removing = scope.remove()
      result = (await running).rows[0].one
      await removing
    })
    expect(result).toBe(1)
    expect(await items()).toEqual([])
    expect(await idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  })
})

describe('an explicit commit() in a request', () => {
  // core README: "After an explicit `commit()` the next statement begins a new transaction (the
  // connection stays with the session until the scope ends ...)".
  it('the committed part survives a later throw; the part after it rolls back; one backend throughout', async () => {
    const { scope, db, idle } = setup()
    const pids: number[] = []
    const err = await scope
      .run(async () => {
        pids.push((await db.query(pidQuery)).rows[0].pid)
        await db.query("INSERT INTO items (v) VALUES ('committed')")
        await scope.getSession().commit()
        expect(await items()).toEqual(['committed'])
        pids.push((await db.query(pidQuery)).rows[0].pid)
        await db.query("INSERT INTO items (v) VALUES ('rolled back')")
        throw new Error('handler failed')
      })
      .catch((e: Error) => e)
    expect(err.message).toBe('handler failed')
    expect(new Set(pids).size).toBe(1)
    expect(await items()).toEqual(['committed'])
    expect(await idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  })
})

describe('a savepoint whose fn caught a statement error', () => {
  // core README: "A savepoint whose `fn` caught a statement's error cannot be released (the
  // database aborted it): it is rolled back to, and `transaction()` rejects with a
  // `TransactionStateError` saying so; the unit of work around it goes on."
  it('transaction() rejects with TransactionStateError saying so; its writes are undone; the unit commits the rest', async () => {
    const { scope, db, idle } = setup()
    let err: unknown
    await scope.run(async () => {
      await db.query("INSERT INTO items (v) VALUES ('outer')")
      err = await scope
        .getSession()
        .transaction(async () => {
          await db.query("INSERT INTO items (v) VALUES ('inner')")
          await db.query("INSERT INTO items (v) VALUES ('outer')").catch(() => {}) // unique violation, caught
        })
        .catch((e) => e)
      await db.query("INSERT INTO items (v) VALUES ('after')")
    })
    expect(err).toBeInstanceOf(TransactionStateError)
    expect((err as Error).message).toContain('rolled back, not released')
    expect(await items()).toEqual(['outer', 'after'])
    expect(await idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  })
})

describe('retry on a real deadlock (40P01)', () => {
  // pg README: "Retryable (for `transaction(fn, { retry })`): `40001` and `40P01`." core README:
  // "with `retry`, the whole thing re-runs from BEGIN on a serialization failure or deadlock".
  it('two jobs that lock two rows in opposite order: the deadlock victim re-runs, both commit', async () => {
    const { scope, db, idle } = setup({ max: 2, pool: { options: '-c deadlock_timeout=50' } })
    let attempts = 0
    const both = await Promise.allSettled(
      [
        [1, 2],
        [2, 1],
      ].map(([first, second]) =>
        scope.runJob(
          () =>
            scope.getSession().transaction(
              async () => {
                attempts++
                await db.query('UPDATE locks SET n = n + 1 WHERE id = $1', [first])
                await sleep(100)
                await db.query('UPDATE locks SET n = n + 1 WHERE id = $1', [second])
              },
              { retry: { attempts: 3, backoffMs: 10 } },
            ),
          { name: `lock-${first}` },
        ),
      ),
    )
    expect(both.map((r) => r.status)).toEqual(['fulfilled', 'fulfilled'])
    expect(attempts).toBe(3)
    expect(await independentQuery(url, 'SELECT id, n FROM locks ORDER BY id')).toEqual([
      { id: 1, n: 2 },
      { id: 2, n: 2 },
    ])
    expect(await idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  })
})

describe('a backend ended by idle_in_transaction_session_timeout (25P03)', () => {
  // pg README: "Fatal: SQLSTATE class 08, `57P01`–`57P05`, `25P03`, ..." and "No process crash
  // on a dead connection" / "A client that errored ... is destroyed".
  it('the next statement fails, nothing is committed, the client is destroyed, the next job works', async () => {
    const { pool, scope, db, idle } = setup({
      max: 1,
      pool: { options: '-c idle_in_transaction_session_timeout=150' },
    })
    let pid = 0
    const err = await scope
      .runJob(
        async () => {
          pid = (await db.query(pidQuery)).rows[0].pid
          await db.query("INSERT INTO items (v) VALUES ('lost')")
          await sleep(600) // idle in transaction past the server's limit
          await db.query("INSERT INTO items (v) VALUES ('never')")
        },
        { name: 'slow' },
      )
      .catch((e: Error) => e)
    expect(err).toBeInstanceOf(Error)
    expect((err as Error).message).toContain('idle-in-transaction timeout')
    expect(await items()).toEqual([])
    expect(scope.stats().totals.destroyed).toBe(1)
    await scope.runJob(
      async () => {
        const next = (await db.query(pidQuery)).rows[0].pid
        expect(next).not.toBe(pid)
        await db.query("INSERT INTO items (v) VALUES ('next')")
      },
      { name: 'next' },
    )
    expect(await items()).toEqual(['next'])
    await waitFor('the pool to settle', () => pool.totalCount === pool.idleCount)
    expect(await idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  })
})

describe("release: 'idle' and a raw BEGIN", () => {
  // core README: "A connection left inside a transaction the session did not open (a raw `BEGIN`
  // never committed) is destroyed when it is given back, never pooled (pgDriver, ...)".
  it('the connection left in the raw BEGIN is destroyed at once, its backend gone; the pool has no idle-in-transaction backend', async () => {
    const { pool, scope, db, idle } = setup({ max: 2 })
    let pid = 0
    await scope.run(
      async () => {
        await scope.getSession().use(async (c) => {
          pid = (await c.query<{ pid: number }>(pidQuery)).rows[0]!.pid
          await c.query('BEGIN')
          await c.query("INSERT INTO items (v) VALUES ('raw')")
        })
        // given back here: destroyed, not pooled
        const next = (await db.query(pidQuery)).rows[0].pid
        expect(next).not.toBe(pid)
      },
      { transaction: 'none', release: 'idle' },
    )
    await waitFor(
      'the raw BEGIN backend to go',
      async () =>
        (await independentQuery(url, 'SELECT 1 FROM pg_stat_activity WHERE pid = $1', [pid]))
          .length === 0,
    )
    expect(await items()).toEqual([])
    expect(pool.totalCount).toBe(pool.idleCount)
    expect(await idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  })
})

describe('work that outlives its scope', () => {
  // core README: "Use after close is an error. A session kept past its scope (a promise nobody
  // awaited ...) throws `SessionClosedError` ... It never opens a new connection behind your
  // back." A `finally` block of fire-and-forget work is where a SQLAlchemy user would put a
  // cleanup statement.
  it('a finally block that runs after the request ended: its statement throws SessionClosedError; nothing new is checked out', async () => {
    const { pool, scope, db, idle } = setup()
    let cleanup: Promise<unknown> | undefined
    const started = pool.totalCount
    await scope.run(async () => {
      await db.query("INSERT INTO items (v) VALUES ('request')")
      void (async () => {
        try {
          await sleep(50)
        } finally {
          cleanup = db.query("INSERT INTO items (v) VALUES ('cleanup')").catch((e) => e)
        }
      })()
    })
    await waitFor('the finally to run', () => cleanup !== undefined)
    const err = await cleanup
    expect(err).toBeInstanceOf(SessionClosedError)
    expect((err as Error).message).toContain("'run'")
    expect(await items()).toEqual(['request'])
    expect(pool.totalCount).toBeLessThanOrEqual(Math.max(started, 1))
    expect(await idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  })
})

describe('remove() not awaited, then a graceful shutdown', () => {
  // core README: "`remove()` ... waits for uses still running (the connection is never released
  // under a statement) ... From the moment `remove()` is called, `getSession()` opens a new
  // session, even while the old one still waits for its uses" and "`scope.close()` ... waits for
  // the open ones up to `timeoutMs` (default 10 s), destroys connections still held".
  // What happens: the run resolves while the removed session's statement still runs, and a
  // close({ timeoutMs: 5000 }) right after does not wait for it: the client is destroyed at
  // once (the test takes ~130 ms), under the statement, which rejects with a SessionClosedError
  // that says "its connection was destroyed because scope.close() timed out after 5000 ms" —
  // it did not time out.
  it('close() waits for the removed session’s running statement, which completes', async () => {
    const { scope, db } = setup()
    let slow: Promise<unknown> | undefined
    await scope.run(async () => {
      await db.query("INSERT INTO items (v) VALUES ('removed')")
      slow = db.query('SELECT pg_sleep(0.3), 1 AS one').then(
        (r) => r.rows[0].one,
        (e: Error) => e,
      )
      await sleep(30)
      void scope.remove()
      await db.query("INSERT INTO items (v) VALUES ('new session')")
    })
    await scope.close({ timeoutMs: 5000 })
    expect(await slow).toBe(1)
    expect(await items()).toEqual(['new session'])
  })
})

describe("maxHoldMs with release: 'idle'", () => {
  // core README: "`maxHoldMs` | past it the connection is destroyed" and "`release: 'idle'` ...
  // the hold time of `pool.query()`, with the session's error handling, names, holders and leak
  // detection": what is held is each checkout, so a request whose statements each take little
  // keeps working although the request as a whole lasts longer than maxHoldMs.
  it('counts each checkout, not the request: three short statements over 3× maxHoldMs all commit', async () => {
    const { scope, db, idle } = setup({ scope: { maxHoldMs: 150 } })
    await scope.run(
      async () => {
        for (const v of ['a', 'b', 'c']) {
          await db.query('INSERT INTO items (v) VALUES ($1)', [v])
          await sleep(120)
        }
      },
      { transaction: 'none', release: 'idle' },
    )
    expect(await items()).toEqual(['a', 'b', 'c'])
    expect(scope.stats().totals).toMatchObject({ forced: 0, destroyed: 0 })
    expect(await idle()).toEqual({ checkedOut: 0, idleInTransaction: 0 })
  })
})
