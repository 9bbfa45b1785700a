/**
 * Aborts and job timeouts against a real PostgreSQL: the running statement is
 * cancelled on the server (not left running), the unit of work rolls back,
 * and the connection, still healthy, goes back to the pool only after the
 * handler settled. An abort while waiting for a connection stops the wait.
 */
import { createScope, ScopeAbortedError } from '@scoped/core'
import { pgDriver } from '@scoped/pg'
import type pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../support/db.ts'
import {
  committedRows,
  createTable,
  expectNoIdleInTransaction,
  expectPoolSettled,
  gate,
  type TestPool,
  testPool,
  waitFor,
} from './support.ts'

let url: string
let t: TestPool
let scope: ReturnType<typeof createScope<pg.PoolClient>>

beforeAll(async () => {
  url = await testDatabase('foundation_abort')
  await createTable(url, 'writes')
  t = testPool(url, 'abort', { max: 2 })
  scope = createScope({ driver: pgDriver(t.pool), default: false, name: 'abort' })
})

afterAll(async () => {
  await scope.close()
})

const pidOf = async (c: pg.PoolClient) =>
  (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid

const stateOf = async (pid: number) =>
  (await independentQuery(url, 'SELECT state FROM pg_stat_activity WHERE pid = $1', [pid]))[0]
    ?.state as string | undefined

describe('aborts and timeouts', () => {
  it('runJob timeoutMs cancels the running statement, rolls back and returns a healthy connection', async () => {
    let pid = 0
    const err = await scope
      .runJob(
        async () => {
          const s = scope.getSession()
          pid = await s.use(pidOf)
          await s.use((c) => c.query("INSERT INTO writes (v) VALUES ('timed out')"))
          await s.use((c) => c.query('SELECT pg_sleep(30)'))
        },
        { name: 'slow-report', timeoutMs: 150 },
      )
      .catch((e) => e)
    // The job says it timed out; the statement it was running was cancelled on the server.
    expect(err).toMatchObject({ code: 'SCOPE_ABORTED', kind: 'timeout', cause: { code: '57014' } })
    expect(err.message).toMatch(/'job:slow-report' was aborted because it ran past its time limit/)
    expect(await stateOf(pid)).toBe('idle') // the backend is free again, not running on
    expect(await committedRows(url, "SELECT v FROM writes WHERE v = 'timed out'")).toEqual([])
    expect(scope.stats().totals.destroyed).toBe(0)
    expectPoolSettled(t.pool)
    await expectNoIdleInTransaction(url, t.app)
  })

  it('a client abort with cancel stops the statement; the connection is released when the handler settles', async () => {
    const open = scope.open({ name: 'GET /export', kind: 'request' })
    const handlerMayEnd = gate()
    let pid = 0
    let statementError: unknown
    const handler = open.enter(async () => {
      const s = scope.getSession()
      pid = await s.use(pidOf)
      await s.use((c) => c.query("INSERT INTO writes (v) VALUES ('aborted')"))
      await s
        .use((c) => c.query('SELECT pg_sleep(30)'))
        .catch((e) => {
          statementError = e
        })
      await handlerMayEnd.promise
    })
    await waitFor('the sleep to run', async () => (await stateOf(pid)) === 'active')
    open.abort('client-abort', { cancel: true })
    await waitFor('the cancel', () => statementError !== undefined)
    expect(statementError).toMatchObject({ code: '57014' })
    // Never released under a running handler: still held while it runs.
    expect(scope.stats().holding).toBe(1)
    expect(open.existingSession?.signal.aborted).toBe(true)
    handlerMayEnd.open()
    await handler
    const ended = await open.end({ commit: true }).catch((e) => e)
    expect(ended).toBeInstanceOf(ScopeAbortedError)
    expect(ended.kind).toBe('client-abort')
    expect(await committedRows(url, "SELECT v FROM writes WHERE v = 'aborted'")).toEqual([])
    expectPoolSettled(t.pool)
    await expectNoIdleInTransaction(url, t.app)
  })

  it('a run() signal aborts a session waiting for a connection; the pool is not disturbed', async () => {
    const release = gate()
    const holders = [1, 2].map((i) =>
      scope.run(
        async () => {
          await scope.getSession().use((c) => c.query('SELECT 1'))
          await release.promise
        },
        { name: `holder-${i}` },
      ),
    )
    await waitFor('the pool to be full', () => scope.stats().holding === 2)
    const ac = new AbortController()
    const waiting = scope.run(() => scope.getSession().use((c) => c.query('SELECT 1')), {
      name: 'waiter',
      signal: ac.signal,
    })
    await waitFor('the waiter to wait', () => scope.stats().waiting === 1)
    ac.abort()
    const err = await waiting.catch((e) => e)
    expect(err).toBeInstanceOf(ScopeAbortedError)
    expect(err.kind).toBe('signal')
    expect(scope.stats().waiting).toBe(0)
    release.open()
    await Promise.all(holders)
    // The pool's own queued checkout got a client later and gave it straight back.
    await waitFor(
      'the pool to settle',
      () => t.pool.waitingCount === 0 && t.pool.idleCount === t.pool.totalCount,
    )
    expectPoolSettled(t.pool)
    expect(scope.stats().holding).toBe(0)
  })
})
