/**
 * Review probes (session 6) of the observability claims against a real pool
 * on the embedded PostgreSQL: under concurrency every `scoped:acquire` has one
 * `scoped:release`, every session one `scoped:close`, and the channel counts,
 * `stats().totals`, the OTel histograms, pg's pool counters and
 * `pg_stat_activity` all tell the same story; `holders()` while requests hold
 * connections is what the database shows (longest-held first), and empty when
 * the pool is idle; `PoolTimeoutError`'s `.holders` and `.pool`; the leak
 * warning names the one request that held too long among many; `maxHoldMs`
 * on the channels.
 */
import dc from 'node:diagnostics_channel'
import type { Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import { serve } from '@hono/node-server'
import {
  type AcquireMessage,
  type CloseMessage,
  channels,
  createScope,
  type LeakMessage,
  PoolTimeoutError,
  type ReleaseMessage,
  type RollbackMessage,
  type Scope,
  type TimeoutMessage,
} from '@scoped/core'
import { instrumentScope } from '@scoped/core/otel'
import { scopedSession as expressSession } from '@scoped/express'
import { scopedSession as honoSession } from '@scoped/hono'
import { pgDriver, scopedPool } from '@scoped/pg'
import express from 'express'
import { Hono } from 'hono'
import type pg from 'pg'
import { afterEach, beforeAll, describe, expect, it } from 'vitest'
import { testMeterProvider } from '../../packages/core/test/otel-support.ts'
import {
  committedRows,
  createTable,
  expectNoIdleInTransaction,
  expectPoolSettled,
  gate,
  memoryLogger,
  testPool,
  waitFor,
} from '../foundation/support.ts'
import { independentQuery, testDatabase } from '../support/db.ts'

let url: string

beforeAll(async () => {
  url = await testDatabase('observability_review_s6')
  await createTable(url, 'orders', 'n int')
  await independentQuery(url, 'CREATE TABLE gate (opened boolean)')
})

type Name = keyof typeof channels
interface Event {
  ch: Name
  msg: any
}
const unsubscribers: (() => void)[] = []
const scopes: Scope<pg.PoolClient>[] = []

/** Every event of every channel, in order, for the scope named `scopeName` only. */
function listen(scopeName: string): Event[] {
  const events: Event[] = []
  for (const ch of Object.keys(channels) as Name[]) {
    const fn = (msg: unknown) => {
      if ((msg as { scope: string }).scope === scopeName) events.push({ ch, msg })
    }
    dc.subscribe(channels[ch].name, fn)
    unsubscribers.push(() => dc.unsubscribe(channels[ch].name, fn))
  }
  return events
}
const of = <T>(events: Event[], ch: Name): T[] =>
  events.filter((e) => e.ch === ch).map((e) => e.msg as T)

afterEach(async () => {
  for (const u of unsubscribers.splice(0)) u()
  await Promise.all(scopes.splice(0).map((s) => s.close({ timeoutMs: 1_000 })))
  await independentQuery(url, 'DELETE FROM gate')
})

/** Sleeps in the database until the test inserts into `gate` (no fixed sleep to race). */
const SLEEP_UNTIL_GATE = `DO $$ BEGIN
  WHILE NOT EXISTS (SELECT 1 FROM gate) LOOP PERFORM pg_sleep(0.02); END LOOP;
END $$`

/** Backends of this test's pool, seen from a connection of their own. */
async function activity(url: string, app: string) {
  return independentQuery<{ application_name: string; state: string }>(
    url,
    `SELECT application_name, state FROM pg_stat_activity
      WHERE datname = current_database() AND pid <> pg_backend_pid()
        AND backend_type = 'client backend' AND (application_name = $1 OR application_name LIKE '% /%')`,
    [app],
  )
}

describe('a storm of mixed runs over a real pool: the channels, stats(), OTel and the database agree', () => {
  it('every acquire has one release, every session one close; totals, histograms, pg and pg_stat_activity add up', async () => {
    const t = testPool(url, 'obs_storm', { max: 4 })
    const scope = createScope({
      driver: pgDriver(t.pool),
      name: 'storm-db',
      default: false,
      acquireTimeoutMs: 20_000,
      onError: () => {},
    })
    scopes.push(scope)
    const db = scopedPool(scope)
    const events = listen('storm-db')
    const otel = testMeterProvider()
    const stop = instrumentScope(scope, { meterProvider: otel.provider })

    // While the storm runs: holders() and stats() agree with each other and with the pool's size.
    const running = new Set<string>()
    const violations: string[] = []
    const sampler = setInterval(() => {
      const h = scope.holders()
      const s = scope.stats()
      if (h.length !== s.holding) violations.push(`holders ${h.length} vs holding ${s.holding}`)
      if (s.holding > 4) violations.push(`holding ${s.holding} > max 4`)
      if (s.inTransaction > s.holding) violations.push(`inTransaction ${s.inTransaction} > holding`)
      for (const x of h) if (!running.has(x.name)) violations.push(`holder ${x.name} not running`)
      for (let i = 1; i < h.length; i++)
        if (h[i]!.heldMs > h[i - 1]!.heldMs) violations.push('holders not longest-held first')
    }, 1)

    const kinds = [
      'commit',
      'throw',
      'explicit-commit',
      'savepoint',
      'empty',
      'idle',
      'fatal',
      'none-tx',
      'timeout',
    ] as const
    type Kind = (typeof kinds)[number]
    const count = Object.fromEntries(kinds.map((k) => [k, 0])) as Record<Kind, number>
    const kindOf = new Map<string, Kind>() // session id → kind
    const one = async (i: number): Promise<unknown> => {
      const kind = kinds[i % kinds.length]!
      count[kind]++
      const name = `${kind} #${i}`
      running.add(name)
      // A job may still hold its connection a moment after it settled (a cancel request goes
      // first): its name stays in the running set.
      if (kind === 'timeout') running.add(`job:timeout #${i}`)
      const note = () => kindOf.set(scope.getSession().id, kind)
      const insert = () => db.query('INSERT INTO orders (n) VALUES ($1)', [i])
      try {
        if (kind === 'timeout') {
          return await scope.runJob(
            async () => {
              note()
              await db.query('SELECT pg_sleep(5)')
            },
            { name: `timeout #${i}`, timeoutMs: 60 },
          )
        }
        if (kind === 'idle' || kind === 'none-tx') {
          return await scope.run(
            async () => {
              note()
              if (kind === 'idle') {
                await insert()
                await new Promise((r) => setTimeout(r, 2))
                await insert()
              } else {
                await scope.getSession().transaction(async () => {
                  await insert()
                })
              }
            },
            { name, transaction: 'none', ...(kind === 'idle' && { release: 'idle' as const }) },
          )
        }
        return await scope.run(
          async () => {
            note()
            const s = scope.getSession()
            if (kind === 'empty') return
            await insert()
            if (kind === 'throw') throw new Error('handler failed')
            if (kind === 'explicit-commit') {
              await s.commit()
              await insert()
            }
            if (kind === 'savepoint') await s.transaction(async () => insert())
            // The handler catches the failure: the unit's end refuses to COMMIT.
            if (kind === 'fatal')
              await db.query('SELECT pg_terminate_backend(pg_backend_pid())').catch(() => {})
          },
          { name },
        )
      } finally {
        running.delete(name)
      }
    }

    const results: PromiseSettledResult<unknown>[] = []
    try {
      for (let b = 0; b < 180; b += 30) {
        const batch = []
        for (let i = b; i < b + 30; i++) batch.push(one(i))
        results.push(...(await Promise.allSettled(batch)))
      }
    } finally {
      clearInterval(sampler)
    }
    try {
      expect(violations.slice(0, 5)).toEqual([])
      const rejected = results.filter((r) => r.status === 'rejected').length
      expect(rejected).toBe(count.throw + count.fatal + count.timeout)

      // stats(): nothing open, held, waiting; the totals are what the kinds make. A job whose
      // timeout fired while it still waited for a connection never checked one out.
      const acquiredIds = new Set(of<AcquireMessage>(events, 'acquire').map((m) => m.session.id))
      const timeoutIds = [...kindOf].filter(([, k]) => k === 'timeout').map(([id]) => id)
      const timedOutWaiting = timeoutIds.filter((id) => !acquiredIds.has(id)).length
      const touched = 180 - count.empty - count.idle - timedOutWaiting
      const st = scope.stats()
      expect(st).toMatchObject({ open: 0, holding: 0, waiting: 0, inTransaction: 0 })
      expect(scope.holders()).toEqual([])
      expect(st.totals).toEqual({
        acquired: touched + 2 * count.idle,
        committed: count.commit + 2 * count['explicit-commit'] + count.savepoint + count['none-tx'],
        rolledBack: count.throw + count.fatal + count.timeout - timedOutWaiting,
        destroyed: count.fatal,
        leaks: 0,
        timeouts: 0,
        forced: 0,
      })

      // The channels: the same counts.
      expect(of(events, 'acquire')).toHaveLength(st.totals.acquired)
      expect(of(events, 'release')).toHaveLength(st.totals.acquired)
      expect(of<ReleaseMessage>(events, 'release').filter((m) => m.destroyed)).toHaveLength(
        st.totals.destroyed,
      )
      expect(of(events, 'commit')).toHaveLength(st.totals.committed)
      expect(of(events, 'rollback')).toHaveLength(st.totals.rolledBack)
      expect(of(events, 'timeout')).toHaveLength(0)
      expect(of(events, 'leak')).toHaveLength(0)
      expect(of(events, 'close')).toHaveLength(180)

      // Per session: acquire and release alternate (acquire first), and close is last, once.
      const bySession = new Map<string, Name[]>()
      for (const e of events) {
        const id = (e.msg as AcquireMessage).session?.id
        if (id === undefined) continue
        const l = bySession.get(id) ?? []
        l.push(e.ch)
        bySession.set(id, l)
      }
      expect(bySession.size).toBe(180)
      const wrong: string[] = []
      for (const [id, seq] of bySession) {
        const pairs = seq.filter((c) => c === 'acquire' || c === 'release')
        const alternate = pairs.every((c, n) => c === (n % 2 === 0 ? 'acquire' : 'release'))
        const closes = seq.filter((c) => c === 'close').length
        if (!alternate || pairs.length % 2 !== 0 || closes !== 1 || seq.at(-1) !== 'close')
          wrong.push(`${id} ${kindOf.get(id)}: ${seq.join(' ')}`)
      }
      expect(wrong).toEqual([])

      // release: 'idle' gives the connection back between statements without an outcome.
      const idleIds = new Set([...kindOf].filter(([, k]) => k === 'idle').map(([id]) => id))
      const idleReleases = of<ReleaseMessage>(events, 'release').filter((m) =>
        idleIds.has(m.session.id),
      )
      expect(idleReleases).toHaveLength(2 * count.idle)
      expect(idleReleases.every((m) => m.outcome === undefined && !m.destroyed)).toBe(true)
      // Every other release carries the session's outcome, which its close repeats.
      const closeOf = new Map(of<CloseMessage>(events, 'close').map((m) => [m.session.id, m]))
      for (const m of of<ReleaseMessage>(events, 'release')) {
        if (idleIds.has(m.session.id)) continue
        expect(m.outcome, kindOf.get(m.session.id)).toBe(closeOf.get(m.session.id)!.outcome)
      }
      const closeOutcomes = (k: Kind) =>
        [...kindOf].filter(([, kk]) => kk === k).map(([id]) => closeOf.get(id)!.outcome)
      expect(new Set(closeOutcomes('commit'))).toEqual(new Set(['committed']))
      expect(new Set(closeOutcomes('explicit-commit'))).toEqual(new Set(['committed']))
      expect(new Set(closeOutcomes('savepoint'))).toEqual(new Set(['committed']))
      expect(new Set(closeOutcomes('none-tx'))).toEqual(new Set(['committed']))
      expect(new Set(closeOutcomes('throw'))).toEqual(new Set(['rolled-back']))
      for (const id of timeoutIds)
        expect(closeOf.get(id)!.outcome).toBe(acquiredIds.has(id) ? 'rolled-back' : 'empty')
      expect(new Set(closeOutcomes('fatal'))).toEqual(new Set(['destroyed']))
      expect(new Set(closeOutcomes('empty'))).toEqual(new Set(['empty']))
      // "error: what caused it (…, the connection's failure)": the unit whose connection failed
      // under a handler that caught the error rolls back with that failure.
      const fatalIds = new Set([...kindOf].filter(([, k]) => k === 'fatal').map(([id]) => id))
      expect(
        of<RollbackMessage>(events, 'rollback')
          .filter((m) => fatalIds.has(m.session.id))
          .every((m) => m.error instanceof Error),
      ).toBe(true)

      // OTel: one wait_time per checkout, one use_time per release, durations by outcome.
      const m = await otel.collect()
      expect(m.histogram('db.client.connection.wait_time')?.count).toBe(st.totals.acquired)
      expect(m.histogram('db.client.connection.use_time')?.count).toBe(st.totals.acquired)
      const byOutcome = (o: string) =>
        of<CloseMessage>(events, 'close').filter((c) => c.outcome === o).length
      const dur = (o: string) =>
        m.histogram('scoped.session.duration', { 'scoped.session.outcome': o })?.count ?? 0
      expect(dur('committed')).toBe(byOutcome('committed'))
      expect(dur('rolled_back')).toBe(byOutcome('rolled-back'))
      expect(dur('destroyed')).toBe(byOutcome('destroyed'))
      // "used" is the pg pool's total - idle: a timed-out job's connection may reach the pool a
      // moment after the job settled (its cancel request goes first), as the README says.
      await waitFor('the pool to settle', () => t.pool.totalCount === t.pool.idleCount)
      const settled = await otel.collect()
      expect(
        settled.value('db.client.connection.count', { 'db.client.connection.state': 'used' }),
      ).toBe(0)

      // The database: what committed is there, nothing else; no backend left in a transaction.
      const rows = await committedRows<{ c: number }>(url, 'SELECT count(*)::int AS c FROM orders')
      expect(rows[0]!.c).toBe(
        count.commit +
          2 * count['explicit-commit'] +
          2 * count.savepoint +
          2 * count.idle +
          count['none-tx'],
      )
      await waitFor('the dead clients to leave the pool', () => t.pool.waitingCount === 0)
      expectPoolSettled(t.pool)
      await expectNoIdleInTransaction(url, t.app)
      const backends = await activity(url, t.app)
      expect(backends.every((b) => b.application_name === t.app && b.state === 'idle')).toBe(true)
      expect(backends).toHaveLength(t.pool.totalCount)
      expect(scope.stats().pool).toEqual({
        total: t.pool.totalCount,
        idle: t.pool.totalCount,
        waiting: 0,
        max: 4,
      })
    } finally {
      stop()
      await otel.provider.shutdown()
      await independentQuery(url, 'DELETE FROM orders')
    }
  }, 60_000)
})

describe('holders() while requests hold connections is what the database shows', () => {
  it('longest-held first, with state, request id and site; stats(), pg and pg_stat_activity agree; empty once idle', async () => {
    const t = testPool(url, 'obs_snapshot', { max: 3 })
    const scope = createScope({
      driver: pgDriver(t.pool, { applicationName: 'auto' }),
      name: 'snapshot-db',
      default: false,
      captureStacks: true,
      acquireTimeoutMs: 20_000,
    })
    scopes.push(scope)
    const db = scopedPool(scope)
    const events = listen('snapshot-db')
    const hold = gate()
    const between = (name: string, requestId: string) =>
      scope.run(
        async () => {
          await db.query('INSERT INTO orders (n) VALUES (1)')
          await hold.promise
        },
        { name, requestId },
      )
    const a = between('GET /a', 'req-a')
    await waitFor('a to hold', () => scope.stats().holding === 1)
    await new Promise((r) => setTimeout(r, 20))
    const b = scope.run(async () => db.query(SLEEP_UNTIL_GATE), {
      name: 'GET /b',
      requestId: 'req-b',
    })
    await waitFor('b to be querying', () => scope.holders()[1]?.state === 'querying')
    await new Promise((r) => setTimeout(r, 20))
    const c = between('POST /c', 'req-c')
    await waitFor('c to hold', () => scope.stats().holding === 3)
    await waitFor('c between statements', () => scope.holders()[2]?.state === 'in-transaction')
    const d = scope.run(async () => db.query('SELECT 1'), { name: 'GET /d', requestId: 'req-d' })
    await waitFor('d to wait', () => scope.stats().waiting === 1)

    const h = scope.holders()
    expect(h.map((x) => [x.name, x.requestId, x.state])).toEqual([
      ['GET /a', 'req-a', 'in-transaction'],
      ['GET /b', 'req-b', 'querying'],
      ['POST /c', 'req-c', 'in-transaction'],
    ])
    expect(h[0]!.heldMs).toBeGreaterThanOrEqual(h[1]!.heldMs)
    expect(h[1]!.heldMs).toBeGreaterThanOrEqual(h[2]!.heldMs)
    for (const x of h) expect(x.site).toContain('review-s6.test.ts')
    expect(scope.stats()).toMatchObject({
      open: 4,
      holding: 3,
      inTransaction: 3,
      waiting: 1,
      pool: { total: 3, idle: 0, waiting: 1, max: 3 },
    })
    // The database: three backends of the pool, each named after its holder (SET LOCAL), one active.
    const rows = await activity(url, t.app)
    expect(rows.map((r) => `${r.application_name} ${r.state}`).sort()).toEqual([
      'GET /a idle in transaction',
      'GET /b active',
      'POST /c idle in transaction',
    ])
    // acquire was published for each holder, and not for the one still waiting.
    expect(of<AcquireMessage>(events, 'acquire').map((m) => m.session.name)).toEqual([
      'GET /a',
      'GET /b',
      'POST /c',
    ])

    hold.open()
    await independentQuery(url, 'INSERT INTO gate VALUES (true)')
    await Promise.all([a, b, c, d])
    expect(scope.holders()).toEqual([])
    expect(scope.stats()).toMatchObject({
      open: 0,
      holding: 0,
      waiting: 0,
      inTransaction: 0,
      totals: { acquired: 4, committed: 4, rolledBack: 0, destroyed: 0 },
      pool: { total: 3, idle: 3, waiting: 0, max: 3 },
    })
    expect(of(events, 'release')).toHaveLength(4)
    expect(of(events, 'commit')).toHaveLength(4)
    const idle = await activity(url, t.app)
    expect(idle.map((r) => `${r.application_name} ${r.state}`)).toEqual([
      `${t.app} idle`,
      `${t.app} idle`,
      `${t.app} idle`,
    ])
    await independentQuery(url, 'DELETE FROM orders')
  })
})

describe('pool timeouts over a real pool', () => {
  it('PoolTimeoutError has .holders (longest first) and .pool; scoped:timeout carries that very error; no acquire for them', async () => {
    const t = testPool(url, 'obs_timeout', { max: 2 })
    const scope = createScope({
      driver: pgDriver(t.pool),
      name: 'timeout-db',
      default: false,
      acquireTimeoutMs: 200,
    })
    scopes.push(scope)
    const db = scopedPool(scope)
    const events = listen('timeout-db')
    const hold = gate()
    const holder = (name: string) =>
      scope.run(
        async () => {
          await db.query('SELECT 1')
          await hold.promise
        },
        { name, requestId: `${name}-id` },
      )
    const h1 = holder('GET /first')
    await waitFor('the first holder', () => scope.stats().holding === 1)
    await new Promise((r) => setTimeout(r, 10))
    const h2 = holder('GET /second')
    await waitFor('both holders', () => scope.stats().holding === 2)
    const waiters = [0, 1, 2].map((n) =>
      scope.run(async () => db.query('SELECT 1'), { name: `GET /waiter${n}` }).catch((e) => e),
    )
    const errors = (await Promise.all(waiters)) as PoolTimeoutError[]
    for (const e of errors) {
      expect(e).toBeInstanceOf(PoolTimeoutError)
      expect(e.code).toBe('POOL_TIMEOUT')
      expect(e.holders.map((x) => [x.name, x.requestId])).toEqual([
        ['GET /first', 'GET /first-id'],
        ['GET /second', 'GET /second-id'],
      ])
      expect(e.holders[0]!.heldMs).toBeGreaterThanOrEqual(e.holders[1]!.heldMs)
      expect(e.pool).toMatchObject({ total: 2, idle: 0, max: 2 })
      expect(e.pool!.waiting).toBeGreaterThanOrEqual(1)
      expect(e.message).toContain("pool 'timeout-db': 2/2 in use, 0 idle")
    }
    const timeouts = of<TimeoutMessage>(events, 'timeout')
    expect(timeouts.map((m) => m.session.name).sort()).toEqual([
      'GET /waiter0',
      'GET /waiter1',
      'GET /waiter2',
    ])
    for (const m of timeouts) {
      expect(errors).toContain(m.error)
      expect(m.waitMs).toBeGreaterThanOrEqual(190)
    }
    expect(scope.stats().totals.timeouts).toBe(3)
    expect(of<AcquireMessage>(events, 'acquire').map((m) => m.session.name)).toEqual([
      'GET /first',
      'GET /second',
    ])
    hold.open()
    await Promise.all([h1, h2])
    await waitFor('the abandoned checkouts to go back', () => t.pool.waitingCount === 0)
    expect(of(events, 'release')).toHaveLength(2)
    expect(scope.holders()).toEqual([])
    expectPoolSettled(t.pool)
  })

  it("a session that gave up waiting never checked a connection out: its close says 'empty'", async () => {
    // OBSERVABILITY.md: "`outcome` adds `empty` (never checked out)"; diagnostics.ts: "`empty`
    // (it never checked a connection out)".
    const t = testPool(url, 'obs_timeout_close', { max: 1 })
    const scope = createScope({
      driver: pgDriver(t.pool),
      name: 'timeout-close-db',
      default: false,
      acquireTimeoutMs: 100,
    })
    scopes.push(scope)
    const db = scopedPool(scope)
    const events = listen('timeout-close-db')
    const hold = gate()
    const h = scope.run(
      async () => {
        await db.query('SELECT 1')
        await hold.promise
      },
      { name: 'GET /holder' },
    )
    await waitFor('the holder', () => scope.stats().holding === 1)
    const err = await scope
      .run(async () => db.query('SELECT 1'), { name: 'GET /waiter' })
      .catch((e) => e)
    expect(err).toBeInstanceOf(PoolTimeoutError)
    hold.open()
    await h
    const close = of<CloseMessage>(events, 'close').find((m) => m.session.name === 'GET /waiter')
    expect(close?.outcome).toBe('empty')
    expect(scope.stats().totals.rolledBack).toBe(0)
    expect(of(events, 'rollback')).toHaveLength(0)
  })
})

describe('leak warnings name the request that held the connection', () => {
  it('among 40 quick requests, one warning, for the one slow request, with its request id and site', async () => {
    const t = testPool(url, 'obs_leak', { max: 4 })
    const logger = memoryLogger()
    const scope = createScope({
      driver: pgDriver(t.pool),
      name: 'leak-db',
      default: false,
      leakDetectionMs: 150,
      captureStacks: true,
      logger,
    })
    scopes.push(scope)
    const db = scopedPool(scope)
    const events = listen('leak-db')
    const slow = scope.run(async () => db.query('SELECT pg_sleep(0.4)'), {
      name: 'GET /slow',
      requestId: 'req-slow',
    })
    const quick = Array.from({ length: 40 }, (_, n) =>
      scope.run(async () => db.query('SELECT $1::int', [n]), {
        name: 'GET /quick',
        requestId: `req-${n}`,
      }),
    )
    await Promise.all([slow, ...quick])
    expect(logger.warnings).toHaveLength(1)
    expect(logger.warnings[0]).toMatch(
      /session 'GET \/slow' \(\w+(\.\w+)?, request req-slow\) of scope 'leak-db'.*state querying\.\nAcquired at:\n.*review-s6\.test\.ts/s,
    )
    const leaks = of<LeakMessage>(events, 'leak')
    expect(leaks).toHaveLength(1)
    expect(leaks[0]!.holder).toMatchObject({ name: 'GET /slow', requestId: 'req-slow' })
    expect(leaks[0]!.holder.id).toBe(leaks[0]!.session.id)
    expect(leaks[0]!.session.requestId).toBe('req-slow')
    expect(leaks[0]!.holder.heldMs).toBeGreaterThanOrEqual(150)
    expect(leaks[0]!.holder.site).toContain('review-s6.test.ts')
    expect(scope.stats().totals.leaks).toBe(1)
    expect(scope.holders()).toEqual([])
    expectPoolSettled(t.pool)
  })

  it("release: 'idle': a session that holds past leakDetectionMs on two checkouts is warned once per checkout", async () => {
    const t = testPool(url, 'obs_leak_idle', { max: 2 })
    const logger = memoryLogger()
    const scope = createScope({
      driver: pgDriver(t.pool),
      name: 'leak-idle-db',
      default: false,
      leakDetectionMs: 100,
      logger,
    })
    scopes.push(scope)
    const db = scopedPool(scope)
    const events = listen('leak-idle-db')
    await scope.run(
      async () => {
        await db.query('SELECT pg_sleep(0.25)')
        await db.query('SELECT pg_sleep(0.25)')
      },
      { name: 'job:two-slow', transaction: 'none', release: 'idle' },
    )
    expect(of(events, 'acquire')).toHaveLength(2)
    expect(of(events, 'release')).toHaveLength(2)
    expect(of<LeakMessage>(events, 'leak').map((m) => m.holder.name)).toEqual([
      'job:two-slow',
      'job:two-slow',
    ])
    expect(logger.warnings).toHaveLength(2)
    expect(scope.stats().totals.leaks).toBe(2)
  })
})

describe('maxHoldMs on the channels, over a real pool', () => {
  it('the connection taken under a running statement: one release (destroyed, with the reason), close destroyed, forced counted, backend gone', async () => {
    const t = testPool(url, 'obs_maxhold', { max: 2 })
    const scope = createScope({
      driver: pgDriver(t.pool),
      name: 'maxhold-db',
      default: false,
      maxHoldMs: 150,
      onError: () => {},
    })
    scopes.push(scope)
    const db = scopedPool(scope)
    const events = listen('maxhold-db')
    const err = await scope
      .run(async () => db.query('SELECT pg_sleep(3)'), { name: 'GET /hog', requestId: 'req-hog' })
      .catch((e) => e)
    expect(err).toBeInstanceOf(Error)
    const releases = of<ReleaseMessage>(events, 'release')
    expect(releases).toHaveLength(1)
    expect(releases[0]).toMatchObject({ destroyed: true, outcome: 'destroyed' })
    expect(releases[0]!.error).toBeInstanceOf(Error)
    expect(releases[0]!.heldMs).toBeGreaterThanOrEqual(140)
    expect(of<CloseMessage>(events, 'close').map((m) => m.outcome)).toEqual(['destroyed'])
    expect(of(events, 'commit')).toHaveLength(0)
    expect(scope.stats().totals).toMatchObject({ acquired: 1, destroyed: 1, forced: 1 })
    expect(scope.holders()).toEqual([])
    await waitFor('the destroyed client to leave the pool', () => t.pool.totalCount === 0)
    await waitFor(
      'no backend of the pool left running pg_sleep',
      async () =>
        (
          await independentQuery(
            url,
            "SELECT 1 FROM pg_stat_activity WHERE application_name = $1 AND query LIKE '%pg_sleep(3)%' AND state = 'active'",
            [t.app],
          )
        ).length === 0,
    )
  })
})

describe('OpenTelemetry claims of OBSERVABILITY.md, over a real pool', () => {
  it('one scope instrumented twice (two providers): both count every session; advised buckets; after close() an empty pool', async () => {
    const t = testPool(url, 'obs_otel_twice', { max: 3 })
    const scope = createScope({ driver: pgDriver(t.pool), name: 'otel-twice', default: false })
    const db = scopedPool(scope)
    const one = testMeterProvider()
    const two = testMeterProvider()
    const stopOne = instrumentScope(scope, { meterProvider: one.provider })
    const stopTwo = instrumentScope(scope, { meterProvider: two.provider })
    try {
      await Promise.all(
        Array.from({ length: 6 }, (_, n) =>
          scope.run(async () => db.query('SELECT $1::int', [n]), { name: 'GET /n' }),
        ),
      )
      for (const p of [one, two]) {
        const m = await p.collect()
        expect(m.histogram('db.client.connection.wait_time')?.count).toBe(6)
        expect(m.histogram('db.client.connection.use_time')?.count).toBe(6)
        expect(
          m.histogram('scoped.session.duration', { 'scoped.session.outcome': 'committed' })?.count,
        ).toBe(6)
        // "Histograms advise the buckets [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10] seconds"
        expect(m.histogram('db.client.connection.use_time')?.buckets.boundaries).toEqual([
          0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10,
        ])
        expect(m.metric('db.client.connection.use_time')?.descriptor.unit).toBe('s')
      }
      // "Call it before (or after) scope.close(); a closed scope just reports an empty pool."
      await scope.close()
      const m = await one.collect()
      expect(m.value('db.client.connection.count', { 'db.client.connection.state': 'used' })).toBe(
        0,
      )
      expect(
        m.value('db.client.connection.count', { 'db.client.connection.state': 'idle' }) ?? 0,
      ).toBe(0)
      expect(m.value('db.client.connection.pending_requests')).toBe(0)
    } finally {
      stopOne()
      stopTwo()
      await one.provider.shutdown()
      await two.provider.shutdown()
      await scope.close()
    }
  })
})

describe('an HTTP storm with client aborts (Hono and Express over real sockets): the channels and the database agree', () => {
  type Route = 'ok' | 'fail' | 'missing' | 'slow' | 'nodb'
  const routes: Route[] = ['ok', 'fail', 'missing', 'slow', 'ok', 'nodb', 'fail', 'ok']

  for (const framework of ['hono', 'express'] as const) {
    it(`${framework}: one release per acquire, one close per session that asked for one; totals, rows and pg_stat_activity add up`, async () => {
      const t = testPool(url, `obs_http_${framework}`, { max: 4 })
      const scopeName = `http-${framework}`
      const scope = createScope({
        driver: pgDriver(t.pool),
        name: scopeName,
        default: false,
        acquireTimeoutMs: 20_000,
        onError: () => {},
      })
      scopes.push(scope)
      const db = scopedPool(scope)
      const events = listen(scopeName)
      const table = `http_${framework}`
      await independentQuery(url, `CREATE TABLE ${table} (n int)`)
      const insert = (n: number) => db.query(`INSERT INTO ${table} (n) VALUES ($1)`, [n])

      let server: Server
      if (framework === 'hono') {
        const app = new Hono()
        app.use(honoSession(scope, { cancelOnAbort: true }))
        app.get('/ok/:n', async (c) => {
          await insert(Number(c.req.param('n')))
          return c.json({ ok: true })
        })
        app.get('/fail/:n', async (c) => {
          await insert(Number(c.req.param('n')))
          throw new Error('failed after the insert')
        })
        app.get('/missing/:n', async (c) => {
          await db.query('SELECT 1 WHERE false')
          return c.json({ error: 'no such thing' }, 404)
        })
        app.get('/slow/:n', async (c) => {
          await db.query('SELECT pg_sleep(3)')
          return c.json({ ok: true })
        })
        app.get('/nodb/:n', (c) => c.json({ ok: true }))
        app.onError((_e, c) => c.json({ error: 'failed' }, 500))
        server = serve({ fetch: app.fetch, port: 0, hostname: '127.0.0.1' }) as Server
      } else {
        const app = express()
        app.use(expressSession(scope, { cancelOnAbort: true }))
        app.get('/ok/:n', async (req, res) => {
          await insert(Number(req.params.n))
          res.json({ ok: true })
        })
        app.get('/fail/:n', async (req) => {
          await insert(Number(req.params.n))
          throw new Error('failed after the insert')
        })
        app.get('/missing/:n', async (_req, res) => {
          await db.query('SELECT 1 WHERE false')
          res.status(404).json({ error: 'no such thing' })
        })
        app.get('/slow/:n', async (_req, res) => {
          await db.query('SELECT pg_sleep(3)')
          res.json({ ok: true })
        })
        app.get('/nodb/:n', (_req, res) => {
          res.json({ ok: true })
        })
        server = app.listen(0, '127.0.0.1')
      }
      await new Promise<void>((resolve) => {
        if (server.listening) resolve()
        else server.once('listening', () => resolve())
      })
      const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
      try {
        const status: Record<string, number> = {}
        const one = async (i: number) => {
          const route = routes[i % routes.length]!
          const ac = new AbortController()
          if (route === 'slow') setTimeout(() => ac.abort(), 100)
          const got = await fetch(`${base}/${route}/${i}`, { signal: ac.signal }).then(
            async (r) => {
              await r.arrayBuffer()
              return String(r.status)
            },
            () => 'aborted',
          )
          const key = `${route} ${got}`
          status[key] = (status[key] ?? 0) + 1
        }
        for (let b = 0; b < 120; b += 24) {
          await Promise.all(Array.from({ length: 24 }, (_, k) => one(b + k)))
        }
        const n = (k: string) => status[k] ?? 0
        expect(status).toEqual({
          'ok 200': n('ok 200'),
          'fail 500': n('fail 500'),
          'missing 404': n('missing 404'),
          'slow aborted': n('slow aborted'),
          'nodb 200': n('nodb 200'),
        })
        await waitFor('every session closed', () => scope.stats().open === 0)

        // Per session: acquire and release alternate, close once and last.
        const bySession = new Map<string, { name: string; seq: Name[] }>()
        for (const e of events) {
          const sess = (e.msg as AcquireMessage).session
          if (!sess) continue
          const entry = bySession.get(sess.id) ?? { name: sess.name, seq: [] }
          entry.seq.push(e.ch)
          bySession.set(sess.id, entry)
        }
        const wrong: string[] = []
        for (const [id, { name, seq }] of bySession) {
          const acq = seq.filter((c) => c === 'acquire').length
          const rel = seq.filter((c) => c === 'release').length
          const closes = seq.filter((c) => c === 'close').length
          if (acq > 1 || acq !== rel || closes !== 1 || seq.at(-1) !== 'close')
            wrong.push(`${id} ${name}: ${seq.join(' ')}`)
        }
        expect(wrong).toEqual([])
        // One session per request that used the database; none for the route that did not.
        const names = [...bySession.values()].map((v) => v.name)
        expect(names.filter((x) => x.includes('/nodb'))).toEqual([])
        expect(bySession.size).toBe(120 - n('nodb 200'))
        const closes = of<CloseMessage>(events, 'close')
        const outcomes = (route: string) =>
          new Set(closes.filter((c) => c.session.name.includes(`/${route}/`)).map((c) => c.outcome))
        expect(outcomes('ok')).toEqual(new Set(['committed']))
        expect(outcomes('missing')).toEqual(new Set(['committed'])) // a 404 commits
        expect(outcomes('fail')).toEqual(new Set(['rolled-back']))
        for (const o of outcomes('slow')) expect(['rolled-back', 'empty']).toContain(o)

        const st = scope.stats()
        expect(st).toMatchObject({ open: 0, holding: 0, waiting: 0, inTransaction: 0 })
        expect(scope.holders()).toEqual([])
        expect(of(events, 'acquire')).toHaveLength(st.totals.acquired)
        expect(of(events, 'release')).toHaveLength(st.totals.acquired)
        expect(of(events, 'commit')).toHaveLength(st.totals.committed)
        expect(of(events, 'rollback')).toHaveLength(st.totals.rolledBack)
        expect(st.totals.committed).toBe(n('ok 200') + n('missing 404'))
        expect(st.totals.rolledBack).toBe(
          n('fail 500') +
            closes.filter((c) => c.outcome === 'rolled-back' && c.session.name.includes('/slow/'))
              .length,
        )
        expect(st.totals).toMatchObject({ destroyed: 0, leaks: 0, timeouts: 0, forced: 0 })

        // The database: one row per 200 of /ok, none from /fail; the aborted sleeps were cancelled.
        const rows = await committedRows<{ c: number }>(
          url,
          `SELECT count(*)::int AS c FROM ${table}`,
        )
        expect(rows[0]!.c).toBe(n('ok 200'))
        await waitFor('no backend of the pool still active', async () =>
          (await activity(url, t.app)).every((b) => b.state === 'idle'),
        )
        expectPoolSettled(t.pool)
        await expectNoIdleInTransaction(url, t.app)
      } finally {
        server.closeAllConnections?.()
        await new Promise((r) => server.close(r))
      }
    }, 60_000)
  }
})

describe('commit and rollback events of real PostgreSQL failures', () => {
  it('transaction(fn, { retry }) after a real 40001: one rollback (with the 40001) per failed attempt, one commit', async () => {
    const t = testPool(url, 'obs_retry', { max: 2 })
    const scope = createScope({ driver: pgDriver(t.pool), name: 'retry-db', default: false })
    scopes.push(scope)
    const db = scopedPool(scope)
    const events = listen('retry-db')
    await independentQuery(url, 'CREATE TABLE counter (id int PRIMARY KEY, v int)')
    await independentQuery(url, 'INSERT INTO counter VALUES (1, 0)')
    let attempt = 0
    await scope.run(
      async () =>
        scope.getSession().transaction(
          async () => {
            attempt++
            await db.query('SELECT v FROM counter WHERE id = 1') // the snapshot is taken
            if (attempt === 1)
              await independentQuery(url, 'UPDATE counter SET v = v + 1 WHERE id = 1')
            await db.query('UPDATE counter SET v = v + 10 WHERE id = 1')
          },
          { isolation: 'repeatable read', retry: { attempts: 3, backoffMs: 1 } },
        ),
      { name: 'job:bump' },
    )
    expect(attempt).toBe(2)
    expect((await committedRows(url, 'SELECT v FROM counter'))[0].v).toBe(11)
    expect(events.map((e) => e.ch)).toEqual(['acquire', 'rollback', 'commit', 'release', 'close'])
    expect((of<RollbackMessage>(events, 'rollback')[0]!.error as { code?: string }).code).toBe(
      '40001',
    )
    expect(of<CloseMessage>(events, 'close')[0]!.outcome).toBe('committed')
    expect(scope.stats().totals).toMatchObject({ acquired: 1, committed: 1, rolledBack: 1 })
  })

  // The core README ("Exactly-once close"): "A COMMIT the server refused with an answer (a
  // deferred constraint, a serialization failure) is followed by a ROLLBACK, and the
  // connection, healthy and outside any transaction, goes back to the pool." (Before session
  // 6 the README said a connection was destroyed whenever COMMIT/ROLLBACK failed, which
  // overstated it: this probe found the difference.)
  it('a COMMIT that fails on a deferred constraint: rollback with the COMMIT error, no commit; the sound connection is returned, not destroyed', async () => {
    const t = testPool(url, 'obs_deferred', { max: 1 })
    const scope = createScope({ driver: pgDriver(t.pool), name: 'deferred-db', default: false })
    scopes.push(scope)
    const db = scopedPool(scope)
    const events = listen('deferred-db')
    await independentQuery(url, 'CREATE TABLE parent (id int PRIMARY KEY)')
    await independentQuery(
      url,
      'CREATE TABLE child (parent_id int REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)',
    )
    let pid: number | undefined
    const err = await scope
      .run(
        async () => {
          pid = (await db.query('SELECT pg_backend_pid() AS pid')).rows[0].pid
          await db.query('INSERT INTO child VALUES (42)')
        },
        { name: 'POST /child' },
      )
      .catch((e) => e)
    expect((err as { code?: string }).code).toBe('23503')
    expect(of(events, 'commit')).toEqual([])
    expect(of<RollbackMessage>(events, 'rollback').map((m) => m.error)).toEqual([err])
    const [release] = of<ReleaseMessage>(events, 'release')
    const [close] = of<CloseMessage>(events, 'close')
    expect(release).toMatchObject({ destroyed: false, outcome: 'rolled-back' })
    expect(close!.outcome).toBe('rolled-back')
    expect(scope.stats().totals).toMatchObject({ committed: 0, rolledBack: 1, destroyed: 0 })
    expect(await committedRows(url, 'SELECT * FROM child')).toEqual([])
    expectPoolSettled(t.pool)
    await expectNoIdleInTransaction(url, t.app)
    // The next session gets the same backend, outside any transaction.
    const again = await scope.run(async () => {
      return (await db.query('SELECT pg_backend_pid() AS pid')).rows[0].pid as number
    })
    expect(again).toBe(pid)
  })
})
