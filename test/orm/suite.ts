/**
 * The guarantees every ORM driver must keep, as one suite each ORM package
 * runs against a real PostgreSQL with its own harness (TypeORM, MikroORM,
 * Drizzle, Prisma). A harness writes through the ORM's own API, so these
 * tests show what an ORM user gets, not what raw SQL gets.
 *
 *   describe('TypeORM', () => ormSuite(typeormHarness))
 */
import type { AddressInfo } from 'node:net'
import { serve } from '@hono/node-server'
import { type Scope, ScopeAbortedError, SessionClosedError } from '@scoped/core'
import { scopedSession } from '@scoped/hono'
import { Hono } from 'hono'
import pg from 'pg'
import { afterAll, beforeAll, beforeEach, expect, it } from 'vitest'
import {
  committedRows,
  expectNoIdleInTransaction,
  uniqueAppName,
  waitFor,
} from '../foundation/support.ts'
import { cancelDelayingProxy } from '../support/cancel-proxy.ts'
import { independentQuery, testDatabase } from '../support/db.ts'

/** The table every harness writes to: each row records the backend and transaction that wrote it. */
export const NOTES_DDL = `CREATE TABLE notes (
  id serial PRIMARY KEY,
  v text NOT NULL,
  pid int NOT NULL DEFAULT pg_backend_pid(),
  txid bigint NOT NULL DEFAULT txid_current()
)`

export interface PoolFigures {
  total: number
  idle: number
  waiting: number
}

/** One ORM wired to a scope over a pool of at most `max` connections. */
export interface OrmFixture {
  scope: Scope<any>
  /** INSERT INTO notes (v) through the ORM, in the current session. */
  insert(v: string): Promise<void>
  /** A statement through the ORM that PostgreSQL rejects (SELECT 1/0, or a constraint). */
  failingStatement(): Promise<unknown>
  /**
   * A statement through the ORM, in the current session, that sleeps `seconds`
   * on the server (`pg_sleep`) and returns `pg_backend_pid()`: the backend
   * that ran it. Run it as work the session tracks (a statement the session
   * does not know is running is never cancelled on abort).
   */
  pidAndSleep(seconds: number): Promise<number>
  /** The ORM pool's own figures (connections opened, idle, waiting). */
  pool(): PoolFigures
  /** End everything the fixture made (the scope closes the ORM). */
  close(): Promise<void>
}

export interface OrmHarness {
  /** The ORM's name in test titles and database names. */
  name: string
  /**
   * Connect the ORM to `url` with a pool of `max` connections whose backends
   * carry `applicationName`, and make a non-default scope over it. The
   * `notes` table (NOTES_DDL) exists already.
   */
  fixture(url: string, opts: { max: number; applicationName: string }): Promise<OrmFixture>
}

class Planned extends Error {}

/**
 * An error and its causes: ORMs wrap what the session throws (Drizzle's
 * DrizzleQueryError keeps it as `cause`; MikroORM's DriverException copies its
 * `code` and message; Prisma keeps the driver adapter's error in
 * `meta.driverAdapterError`, whose `cause` has the SQLSTATE), and users see the chain.
 */
function chain(error: unknown): unknown[] {
  const list: unknown[] = []
  for (let e = error; e !== undefined && e !== null && list.length < 5; e = causeOf(e)) {
    list.push(e)
  }
  return list
}

function causeOf(e: unknown): unknown {
  const { cause, meta } = e as { cause?: unknown; meta?: { driverAdapterError?: unknown } }
  return cause ?? meta?.driverAdapterError
}

function isSessionClosed(error: unknown): boolean {
  return chain(error).some(
    (e) => e instanceof SessionClosedError || (e as { code?: unknown }).code === 'SESSION_CLOSED',
  )
}

function isQueryCanceled(error: unknown): boolean {
  return chain(error).some((e) => (e as { code?: unknown })?.code === '57014')
}

function isExpectedFailure(error: unknown): boolean {
  return chain(error).some(
    (e) => e instanceof Planned || /division by zero/.test(String((e as Error)?.message)),
  )
}

/** Register the suite's tests in the calling `describe`. */
export function ormSuite(harness: OrmHarness): void {
  let url: string
  let app: string
  let f: OrmFixture

  beforeAll(async () => {
    url = await testDatabase(`orm_${harness.name}`)
    await independentQuery(url, NOTES_DDL)
    app = uniqueAppName(harness.name)
    f = await harness.fixture(url, { max: 2, applicationName: app })
  })

  beforeEach(async () => {
    await independentQuery(url, 'TRUNCATE notes')
  })

  afterAll(async () => {
    await f?.close()
  })

  const notes = () =>
    committedRows<{ v: string; pid: number; txid: string }>(
      url,
      'SELECT v, pid, txid FROM notes ORDER BY id',
    )

  const settled = async () => {
    await waitFor('every scope ended', () => f.scope.stats().open === 0)
    await waitFor(`${harness.name} pool idle`, () => {
      const p = f.pool()
      return p.total === p.idle && p.waiting === 0
    })
    await expectNoIdleInTransaction(url, app)
  }

  it('a scope with two writes and a throw leaves nothing', async () => {
    const run = f.scope.run(async () => {
      await f.insert('a')
      await f.insert('b')
      throw new Planned('after both writes')
    })
    await expect(run).rejects.toBeInstanceOf(Planned)
    expect(await notes()).toEqual([])
    await settled()
  })

  it('without the throw both writes commit in one transaction on one backend', async () => {
    await f.scope.run(async () => {
      await f.insert('a')
      await f.insert('b')
      // Not committed yet: an independent connection sees nothing until the scope ends.
      expect(await notes()).toEqual([])
    })
    const rows = await notes()
    expect(rows.map((r) => r.v)).toEqual(['a', 'b'])
    expect(rows[0]!.pid).toBe(rows[1]!.pid)
    expect(rows[0]!.txid).toBe(rows[1]!.txid)
    // The backend that wrote them is one of this ORM pool's connections, now idle.
    const backends = await independentQuery<{ pid: number; state: string }>(
      url,
      'SELECT pid, state FROM pg_stat_activity WHERE application_name = $1',
      [app],
    )
    expect(backends.map((b) => b.pid)).toContain(rows[0]!.pid)
    await settled()
  })

  it('a nested transaction() is a savepoint: an inner throw undoes only the inner writes', async () => {
    await f.scope.run(async () => {
      const session = f.scope.getSession()
      await f.insert('outer-before')
      const inner = session.transaction(async () => {
        await f.insert('inner')
        throw new Planned('inner fails')
      })
      await expect(inner).rejects.toBeInstanceOf(Planned)
      await session.transaction(async () => {
        await f.insert('inner-kept')
      })
      await f.insert('outer-after')
    })
    const rows = await notes()
    expect(rows.map((r) => r.v)).toEqual(['outer-before', 'inner-kept', 'outer-after'])
    expect(new Set(rows.map((r) => r.txid)).size).toBe(1)
    await settled()
  })

  it('an SQL error inside a savepoint is recoverable; the outer unit of work commits', async () => {
    await f.scope.run(async () => {
      await f.insert('before')
      await expect(f.scope.getSession().transaction(() => f.failingStatement())).rejects.toThrow()
      await f.insert('after')
    })
    expect((await notes()).map((r) => r.v)).toEqual(['before', 'after'])
    await settled()
  })

  it('work that outlives its scope fails with SessionClosedError and writes nothing', async () => {
    let late: Promise<void> | undefined
    await f.scope.run(async () => {
      await f.insert('in-time')
      // Fire-and-forget: runs after the scope ended, still inside its async context.
      late = new Promise((r) => setTimeout(r, 20)).then(() => f.insert('too-late'))
    })
    const error = await late!.then(
      () => undefined,
      (e: unknown) => e,
    )
    expect(isSessionClosed(error), `expected SessionClosedError, got ${String(error)}`).toBe(true)
    expect(
      chain(error)
        .map((e) => (e as Error).message)
        .join('\n'),
    ).toMatch(/which is closed/)
    expect((await notes()).map((r) => r.v)).toEqual(['in-time'])
    await settled()
  })

  it('a job timeout cancels the running statement on the server (57014)', async () => {
    const err = await f.scope
      // A first short statement checks out and begins, so that on a loaded machine the timeout
      // still lands inside the sleep (before the statement started, there is nothing to cancel).
      .runJob(
        async () => {
          await f.pidAndSleep(0)
          return f.pidAndSleep(5)
        },
        { name: 'slow', timeoutMs: 1_000 },
      )
      .catch((e: unknown) => e)
    // The job rejects as timed out; what the statement got is the cause: cancelled by the server
    // (without the cancel the sleep would run its 5 s and end without an error).
    expect(err).toBeInstanceOf(ScopeAbortedError)
    expect((err as ScopeAbortedError).kind).toBe('timeout')
    expect(
      isQueryCanceled((err as Error).cause),
      `expected a 57014 cause, got ${String((err as Error).cause)}`,
    ).toBe(true)
    await settled()
    const sleeping = await independentQuery(
      url,
      "SELECT 1 FROM pg_stat_activity WHERE application_name = $1 AND query LIKE '%pg_sleep%' AND state = 'active'",
      [app],
    )
    expect(sleeping).toEqual([])
  })

  it('a cancel that lands late does not cancel the next holder of the connection', async () => {
    // A proxy holds every CancelRequest back by 300 ms, so the cancel is certain to arrive after
    // the statement it was sent for ended; one connection, so the next scope gets that very
    // backend. The driver must keep the connection until its cancel is done.
    const proxy = await cancelDelayingProxy(url, 300)
    const one = await harness.fixture(proxy.url, { max: 1, applicationName: `${app}_late` })
    try {
      // A request aborted (with cancel) while its short statement runs: the statement ends on its
      // own long before the cancel arrives.
      const open = one.scope.open({ name: 'aborted', kind: 'request' })
      const first = await open.enter(async () => {
        await one.pidAndSleep(0) // checked out and in its transaction
        const running = one.pidAndSleep(0.05)
        await new Promise((r) => setTimeout(r, 10))
        open.abort('client-abort', { cancel: true })
        return running
      })
      await open.end({ commit: false })

      // The next holder runs a statement that spans the moment the late cancel lands.
      const second = await one.scope.run(() => one.pidAndSleep(0.5))
      expect(second).toBe(first)
      expect(proxy.cancelRequests, 'the abort sent a CancelRequest').toBe(1)
      const p = one.pool()
      expect(p.total).toBe(p.idle)
    } finally {
      await one.close()
      await proxy.close()
    }
  })

  it('a pool of 2 never runs dry over 1,000 scopes with errors', async () => {
    const N = 1_000
    const committedBefore = f.scope.stats().totals.committed
    let committed = 0
    let failed = 0
    let next = 0
    const worker = async () => {
      while (next < N) {
        const n = next++
        try {
          await f.scope.run(
            async () => {
              if (n % 7 === 3) throw new Planned(`before any statement in ${n}`)
              await f.insert(`n${n}`)
              if (n % 5 === 1) throw new Planned(`after the write in ${n}`)
              if (n % 5 === 2) await f.failingStatement()
              await f.insert(`n${n}-second`)
            },
            { name: `iteration ${n % 10}` },
          )
          committed++
        } catch (e) {
          if (!isExpectedFailure(e)) throw e
          failed++
        }
      }
    }
    await Promise.all(Array.from({ length: 8 }, worker))
    expect(committed + failed).toBe(N)
    expect(failed).toBeGreaterThan(N / 3)
    const rows = await notes()
    expect(rows.length).toBe(committed * 2)
    await settled()
    const stats = f.scope.stats()
    expect(stats.holding).toBe(0)
    expect(stats.totals.committed - committedBefore).toBe(committed)
    expect(f.pool().total).toBeLessThanOrEqual(2)
  })

  it('behind @scoped/hono, a row is visible to another connection the moment the client has the response (50 times)', async () => {
    const honoApp = new Hono()
    honoApp.use(scopedSession(f.scope))
    honoApp.post('/notes/:v', async (c) => {
      await f.insert(c.req.param('v'))
      return c.text('created', 201)
    })
    const server = await new Promise<ReturnType<typeof serve>>((resolve) => {
      const s = serve({ fetch: honoApp.fetch, port: 0, hostname: '127.0.0.1' }, () => resolve(s))
    })
    const port = (server.address() as AddressInfo).port
    const observer = new pg.Client({ connectionString: url })
    await observer.connect()
    try {
      for (let i = 0; i < 50; i++) {
        const res = await fetch(`http://127.0.0.1:${port}/notes/v${i}`, { method: 'POST' })
        expect(res.status).toBe(201)
        // No wait, no retry: the client holds the response, so the COMMIT already happened.
        const { rowCount } = await observer.query('SELECT 1 FROM notes WHERE v = $1', [`v${i}`])
        expect(rowCount, `row v${i} visible when the client had its 201`).toBe(1)
        await res.text()
      }
    } finally {
      await observer.end()
      await new Promise<void>((done) => {
        ;(server as unknown as { closeAllConnections(): void }).closeAllConnections()
        server.close(() => done())
      })
    }
    await settled()
  })
}
