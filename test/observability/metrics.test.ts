/**
 * The OpenTelemetry metrics of a scope over a real pg.Pool match what
 * happened: sessions by outcome, waits, uses, real pool timeouts, the pool's
 * gauges, and a connection destroyed after its backend was terminated.
 */
import { createScope } from '@scoped/core'
import { instrumentScope } from '@scoped/core/otel'
import { pgDriver, scopedPool } from '@scoped/pg'
import { beforeAll, describe, expect, it } from 'vitest'
import { testMeterProvider } from '../../packages/core/test/otel-support.ts'
import {
  committedRows,
  createTable,
  expectNoIdleInTransaction,
  expectPoolSettled,
  gate,
  testPool,
  waitFor,
} from '../foundation/support.ts'
import { independentQuery, testDatabase } from '../support/db.ts'

let url: string

beforeAll(async () => {
  url = await testDatabase('observability_metrics')
  await createTable(url, 'orders', 'n int')
})

const pool = (name: string) => ({ 'db.client.connection.pool.name': name })

describe('metrics over a real pool', () => {
  it('100 requests, 10 of which throw: 90 committed and 10 rolled-back sessions, 100 waits and uses', async () => {
    const t = testPool(url, 'metrics_100', { max: 4 })
    const scope = createScope({ driver: pgDriver(t.pool), name: 'orders-db', default: false })
    const db = scopedPool(scope)
    const otel = testMeterProvider()
    const stop = instrumentScope(scope, { meterProvider: otel.provider })
    try {
      const outcomes = await Promise.all(
        Array.from({ length: 100 }, (_, n) =>
          scope
            .run(
              async () => {
                await db.query('INSERT INTO orders (n) VALUES ($1)', [n])
                if (n % 10 === 3) throw new Error(`order ${n} rejected`)
              },
              { name: 'POST /orders' },
            )
            .then(
              () => 'ok',
              () => 'threw',
            ),
        ),
      )
      expect(outcomes.filter((o) => o === 'threw')).toHaveLength(10)
      // What the database says happened...
      const rows = await committedRows<{ n: number }>(url, 'SELECT n FROM orders ORDER BY n')
      expect(rows).toHaveLength(90)
      expect(rows.some((r) => r.n % 10 === 3)).toBe(false)
      // ...is what the metrics say.
      const m = await otel.collect()
      const duration = (outcome: string) =>
        m.histogram('scoped.session.duration', {
          ...pool('orders-db'),
          'scoped.session.outcome': outcome,
        })
      expect(duration('committed')?.count).toBe(90)
      expect(duration('rolled_back')?.count).toBe(10)
      expect(duration('destroyed')).toBeUndefined()
      expect(m.histogram('db.client.connection.wait_time', pool('orders-db'))?.count).toBe(100)
      const use = m.histogram('db.client.connection.use_time', pool('orders-db'))
      expect(use?.count).toBe(100)
      // Every use ran a statement on the server: it took time, in seconds (well under one each).
      expect(use!.min!).toBeGreaterThan(0)
      expect(use!.sum).toBeLessThan(100)
      expect(m.value('db.client.connection.timeouts', pool('orders-db'))).toBeUndefined()
      // The pool at rest: nothing in use, its connections idle, its size, nobody waiting.
      expect(m.value('db.client.connection.count', { 'db.client.connection.state': 'used' })).toBe(
        0,
      )
      expect(m.value('db.client.connection.count', { 'db.client.connection.state': 'idle' })).toBe(
        t.pool.idleCount,
      )
      expect(t.pool.idleCount).toBeGreaterThan(0)
      expect(m.value('db.client.connection.max', pool('orders-db'))).toBe(4)
      expect(m.value('db.client.connection.pending_requests', pool('orders-db'))).toBe(0)
      expectPoolSettled(t.pool)
      await expectNoIdleInTransaction(url, t.app)
    } finally {
      stop()
      await otel.provider.shutdown()
      await scope.close()
    }
  })

  it('timeouts counts real pool timeouts; the gauges show the exhausted pool while it lasts', async () => {
    const t = testPool(url, 'metrics_timeouts', { max: 1 })
    const scope = createScope({
      driver: pgDriver(t.pool),
      name: 'tiny',
      default: false,
      acquireTimeoutMs: 150,
    })
    const db = scopedPool(scope)
    const otel = testMeterProvider()
    const stop = instrumentScope(scope, { meterProvider: otel.provider })
    try {
      const hold = gate()
      const holder = scope.run(
        async () => {
          await db.query('SELECT 1')
          await hold.promise
        },
        { name: 'GET /slow' },
      )
      await waitFor('the holder', () => scope.stats().holding === 1)
      const waiters = Array.from({ length: 2 }, () =>
        scope.run(async () => db.query('SELECT 1'), { name: 'GET /fast' }).catch((e: unknown) => e),
      )
      await waitFor('two waiters in the pool', () => t.pool.waitingCount === 2)
      const busy = await otel.collect()
      expect(
        busy.value('db.client.connection.count', { 'db.client.connection.state': 'used' }),
      ).toBe(1)
      expect(
        busy.value('db.client.connection.count', { 'db.client.connection.state': 'idle' }),
      ).toBe(0)
      expect(busy.value('db.client.connection.pending_requests')).toBe(2)
      expect((await Promise.all(waiters)).map((e) => (e as { code?: string }).code)).toEqual([
        'POOL_TIMEOUT',
        'POOL_TIMEOUT',
      ])
      hold.open()
      await holder
      await waitFor('the abandoned checkouts to go back', () => t.pool.waitingCount === 0)
      // After the storm, one more request gets the connection at once.
      await scope.run(async () => db.query('SELECT 1'), { name: 'GET /fast' })
      const m = await otel.collect()
      expect(m.value('db.client.connection.timeouts', pool('tiny'))).toBe(2)
      expect(scope.stats().totals.timeouts).toBe(2)
      expect(m.histogram('db.client.connection.wait_time')?.count).toBe(2)
      expect(
        m.histogram('scoped.session.duration', { 'scoped.session.outcome': 'committed' })?.count,
      ).toBe(2)
      expectPoolSettled(t.pool)
    } finally {
      stop()
      await otel.provider.shutdown()
      await scope.close()
    }
  })

  it('a session whose backend was terminated is a destroyed session, and its connection is not reused', async () => {
    const t = testPool(url, 'metrics_destroyed', { max: 2 })
    const scope = createScope({ driver: pgDriver(t.pool), name: 'fragile', default: false })
    const db = scopedPool(scope)
    const otel = testMeterProvider()
    const stop = instrumentScope(scope, { meterProvider: otel.provider })
    try {
      const err = await scope
        .run(
          async () => {
            const { rows } = await db.query('SELECT pg_backend_pid() AS pid')
            await independentQuery(url, 'SELECT pg_terminate_backend($1)', [rows[0].pid])
            await db.query('SELECT 1')
          },
          { name: 'GET /fragile' },
        )
        .catch((e: unknown) => e)
      expect(err).toBeInstanceOf(Error)
      const m = await otel.collect()
      expect(
        m.histogram('scoped.session.duration', { 'scoped.session.outcome': 'destroyed' })?.count,
      ).toBe(1)
      expect(m.histogram('db.client.connection.use_time')?.count).toBe(1)
      expect(scope.stats().totals.destroyed).toBe(1)
      await waitFor('the dead client to leave the pool', () => t.pool.totalCount === 0)
      expect(m.metric('scoped.session.duration')?.dataPoints).toHaveLength(1)
    } finally {
      stop()
      await otel.provider.shutdown()
      await scope.close()
    }
  })
})
