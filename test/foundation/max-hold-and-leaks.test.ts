/**
 * maxHoldMs and leakDetectionMs against a real PostgreSQL.
 *
 * maxHoldMs: a job that holds its connection too long loses it. The client is
 * destroyed (its backend goes away, its uncommitted writes with it), never
 * returned to the pool half-used; the job's next statement throws
 * SessionClosedError; other work gets a connection, so the pool never runs dry.
 *
 * leakDetectionMs: a warning through the `logger` option that names the
 * session and where it took the connection.
 */
import { createScope, SessionClosedError, TransactionStateError } from '@scoped/core'
import { pgDriver } from '@scoped/pg'
import type pg from 'pg'
import { beforeAll, describe, expect, it } from 'vitest'
import { backends, independentQuery, testDatabase } from '../support/db.ts'
import {
  committedRows,
  createTable,
  expectNoIdleInTransaction,
  expectPoolSettled,
  gate,
  memoryLogger,
  testPool,
  waitFor,
} from './support.ts'

let url: string

beforeAll(async () => {
  url = await testDatabase('foundation_max_hold')
  await createTable(url, 'held')
})

const pidOf = async (c: pg.PoolClient) =>
  (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid

const alive = async (pid: number) =>
  (await independentQuery(url, 'SELECT 1 FROM pg_stat_activity WHERE pid = $1', [pid])).length > 0

describe('maxHoldMs', () => {
  it('destroys a connection held too long; the job fails loudly; the pool keeps serving', async () => {
    const t = testPool(url, 'max_hold', { max: 1 })
    const scope = createScope({
      driver: pgDriver(t.pool),
      default: false,
      name: 'max-hold',
      maxHoldMs: 150,
      leakDetectionMs: 0,
    })
    try {
      const resume = gate()
      let pid = 0
      const greedy = scope.runJob(
        async () => {
          const s = scope.getSession()
          pid = await s.use(pidOf)
          await s.use((c) => c.query("INSERT INTO held (v) VALUES ('greedy')"))
          await resume.promise
          await s.use((c) => c.query("INSERT INTO held (v) VALUES ('too late')"))
        },
        { name: 'greedy' },
      )
      greedy.catch(() => {})
      await waitFor('maxHoldMs to take the connection', () => scope.stats().totals.forced === 1)
      expect(scope.stats().totals.destroyed).toBe(1)
      expect(scope.stats().holding).toBe(0)
      await waitFor(`backend ${pid} to exit`, async () => !(await alive(pid)))

      // The pool of one is not dry: another job gets a (new) connection while greedy still runs.
      const otherPid = await scope.runJob(
        async () => {
          const s = scope.getSession()
          await s.use((c) => c.query("INSERT INTO held (v) VALUES ('other')"))
          return s.use(pidOf)
        },
        { name: 'other' },
      )
      expect(otherPid).not.toBe(pid)

      resume.open()
      const err = await greedy.catch((e) => e)
      expect(err).toBeInstanceOf(SessionClosedError)
      expect(err.message).toContain("'job:greedy'")
      expect(err.message).toContain('maxHoldMs')

      expect((await committedRows(url, 'SELECT v FROM held ORDER BY id')).map((r) => r.v)).toEqual([
        'other',
      ])
      expectPoolSettled(t.pool)
      await expectNoIdleInTransaction(url, t.app)
    } finally {
      await scope.close()
    }
  })

  it('a job whose statement runs past maxHoldMs: the statement is stopped on the server too', async () => {
    const t = testPool(url, 'max_hold_query', { max: 1 })
    const scope = createScope({
      driver: pgDriver(t.pool),
      default: false,
      name: 'max-hold-query',
      maxHoldMs: 200,
      leakDetectionMs: 0,
    })
    try {
      let pid = 0
      const slow = scope.runJob(
        async () => {
          const s = scope.getSession()
          pid = await s.use(pidOf)
          await s.use((c) => c.query("INSERT INTO held (v) VALUES ('slow')"))
          await s.use((c) => c.query('SELECT pg_sleep(30)'))
        },
        { name: 'slow' },
      )
      const err = await slow.catch((e) => e)
      // Not pg's bare "Connection terminated": who took the connection, and why.
      expect(err).toBeInstanceOf(SessionClosedError)
      expect(err.message).toContain("'job:slow'")
      expect(err.message).toContain('maxHoldMs')
      // The statement was cut off: by the cancel (sent first) or by the socket closing.
      expect(err.cause?.message).toMatch(
        /Connection terminated|canceling statement due to user request/,
      )
      expect(scope.stats().totals.forced).toBe(1)
      // The backend does not keep running the 30 s statement (holding its locks) for nobody.
      await waitFor(`backend ${pid} to exit`, async () => !(await alive(pid)), 5_000)
      expect(await committedRows(url, "SELECT v FROM held WHERE v = 'slow'")).toEqual([])
      const n = await scope.runJob(async () =>
        scope.getSession().use(async (c) => (await c.query('SELECT 1 AS n')).rows[0].n),
      )
      expect(n).toBe(1)
      expectPoolSettled(t.pool)
    } finally {
      await scope.close()
    }
  })

  it('a request-like run that loses its connection reports that it did not commit', async () => {
    const t = testPool(url, 'max_hold_commit', { max: 1 })
    const scope = createScope({
      driver: pgDriver(t.pool),
      default: false,
      name: 'max-hold-commit',
      maxHoldMs: 100,
      leakDetectionMs: 0,
    })
    try {
      const err = await scope
        .run(
          async () => {
            await scope
              .getSession()
              .use((c) => c.query("INSERT INTO held (v) VALUES ('never committed')"))
            // Holds past maxHoldMs, runs no further statement, and resolves.
            await new Promise((r) => setTimeout(r, 250))
          },
          { name: 'POST /held' },
        )
        .catch((e) => e)
      expect(err).toBeInstanceOf(TransactionStateError)
      expect(err.message).toContain("'POST /held' was not committed")
      expect(err.message).toContain('maxHoldMs')
      expect(await committedRows(url, "SELECT v FROM held WHERE v = 'never committed'")).toEqual([])
      expectPoolSettled(t.pool)
    } finally {
      await scope.close()
    }
  })
})

describe('leakDetectionMs', () => {
  it('warns through the logger, naming the session and the acquisition site', async () => {
    const t = testPool(url, 'leak', { max: 2 })
    const logger = memoryLogger()
    const scope = createScope({
      driver: pgDriver(t.pool),
      default: false,
      name: 'leaky',
      leakDetectionMs: 50,
      captureStacks: true,
      logger,
    })
    try {
      await scope.run(
        async () => {
          await scope.getSession().use((c) => c.query('SELECT 1'))
          await waitFor('the leak warning', () => logger.warnings.length > 0)
        },
        { name: 'GET /reports/:id' },
      )
      expect(logger.warnings).toHaveLength(1)
      const warning = logger.warnings[0]!
      expect(warning).toContain("session 'GET /reports/:id'")
      expect(warning).toContain("scope 'leaky'")
      expect(warning).toContain('leakDetectionMs: 50')
      expect(warning).toContain('Acquired at:')
      expect(warning).toContain('max-hold-and-leaks.test.ts')
      expect(scope.stats().totals.leaks).toBe(1)
      // A warning only: the unit of work still commits and the connection goes back.
      expect(scope.stats().totals.destroyed).toBe(0)
      expectPoolSettled(t.pool)
      expect((await backends(url, t.app)).every((b) => b.state === 'idle')).toBe(true)
    } finally {
      await scope.close()
    }
  })

  it('does not warn for a session released before leakDetectionMs', async () => {
    const t = testPool(url, 'no_leak', { max: 2 })
    const logger = memoryLogger()
    const scope = createScope({
      driver: pgDriver(t.pool),
      default: false,
      name: 'tidy',
      leakDetectionMs: 100,
      logger,
    })
    try {
      for (let i = 0; i < 5; i++) {
        await scope.run(() => scope.getSession().use((c) => c.query('SELECT 1')))
      }
      await new Promise((r) => setTimeout(r, 150))
      expect(logger.warnings).toEqual([])
      expect(scope.stats().totals.leaks).toBe(0)
    } finally {
      await scope.close()
    }
  })
})
