/**
 * The pg-boss worker: started as `pnpm start` starts it, it enqueues a job per
 * new order and works the queue, each handler in `runJob`; SIGTERM lets the
 * job in progress finish. And `sendInUnitOfWork`: a job exists if and only if
 * the unit of work that sent it committed.
 */
import { createOrders, createSchema, type DB, type Orders } from '@examples/shared'
import { createScope, type Scope } from '@scoped/core'
import { expectNoLeaks } from '@scoped/core/testing'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import { type DatabaseConnection, type Kysely, PostgresDialect } from 'kysely'
import pg from 'pg'
import PgBoss from 'pg-boss'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { backends, independentQuery, testDatabase } from '../../../test/support/db.ts'
import { type ExampleProcess, startExample } from '../../shared/test/child.ts'
import { QUEUE, sendInUnitOfWork, workOrders } from '../src/queue.ts'

let url: string
let scope: Scope<DatabaseConnection>
let db: Kysely<DB>
let worker: ExampleProcess | undefined

beforeAll(async () => {
  url = await testDatabase('example_pg_boss')
  const pool = new pg.Pool({ connectionString: url, max: 2 })
  scope = createScope({
    driver: kyselyDriver(new PostgresDialect({ pool }), { pool }),
    default: false,
  })
  db = scopedKysely<DB>(scope)
  await scope.run(() => createSchema(db), { name: 'migrate' })
})

afterAll(async () => {
  await worker?.stop('SIGKILL')
  await scope?.close()
})

describe('pg-boss worker: pnpm start', () => {
  it('works one job per new order; SIGTERM mid-job lets it finish, exits 0 and leaves no connection', async () => {
    const orders = createOrders(db)
    const ids = await scope.run(async () => {
      const out: number[] = []
      for (let i = 0; i < 3; i++) {
        out.push(
          (
            await orders.create({
              customer: `c${i}`,
              items: [{ sku: 'A', quantity: 1, priceCents: 100 }],
            })
          ).id,
        )
      }
      return out
    })
    worker = startExample('pg-boss-worker', { DATABASE_URL: url, WORK_MS: '1500' })
    const [, name] = await worker.waitFor(/(pg-boss-\d+) started/)
    expect(worker.output()).toContain(`enqueued 3 new orders on '${QUEUE}'`)

    // Wait for the third job to start, then stop the worker in the middle of it.
    const deadline = Date.now() + 60_000
    while (
      [...worker.output().matchAll(/processing order \d+/g)].length < 3 &&
      Date.now() < deadline
    ) {
      await new Promise((r) => setTimeout(r, 50))
    }
    const started = [...worker.output().matchAll(/processing order (\d+)/g)].map((m) =>
      Number(m[1]),
    )
    expect(started.sort((a, b) => a - b)).toEqual(ids)
    const { code } = await worker.stop('SIGTERM')
    expect(code).toBe(0)
    expect(worker.output()).toContain(`${name} stopped`)

    const rows = await independentQuery<{ status: string; processed_by: string }>(
      url,
      'SELECT status, processed_by FROM orders ORDER BY id',
    )
    expect(rows).toEqual(ids.map(() => ({ status: 'processed', processed_by: name })))
    const jobs = await independentQuery<{ state: string; n: number }>(
      url,
      'SELECT state, count(*)::int AS n FROM pgboss.job WHERE name = $1 GROUP BY state',
      [QUEUE],
    )
    expect(jobs).toEqual([{ state: 'completed', n: 3 }])
    expect(await backends(url, 'orders-pg-boss')).toEqual([])
    expect(await backends(url, 'pg-boss')).toEqual([])
  }, 150_000)
})

describe('sendInUnitOfWork (pg-boss on the session connection)', () => {
  let boss: PgBoss

  beforeAll(async () => {
    boss = new PgBoss({ connectionString: url, max: 2 })
    await boss.start()
    await boss.createQueue(QUEUE)
    await independentQuery(url, 'DELETE FROM pgboss.job WHERE name = $1', [QUEUE])
  }, 60_000)

  afterAll(async () => {
    await boss?.stop({ graceful: false })
  })

  const queued = async () =>
    (
      await independentQuery<{ n: number }>(
        url,
        'SELECT count(*)::int AS n FROM pgboss.job WHERE name = $1',
        [QUEUE],
      )
    )[0]?.n

  it('a job sent in a unit of work that rolls back never exists', async () => {
    await expect(
      scope.run(async () => {
        await sendInUnitOfWork(boss, db, { orderId: 1 })
        throw new Error('the request failed after enqueueing')
      }),
    ).rejects.toThrow('the request failed')
    expect(await queued()).toBe(0)
    await expectNoLeaks(scope)
  })

  it('a job sent in a unit of work that commits is there once it committed', async () => {
    let seenInside: number | undefined
    await scope.run(async () => {
      await sendInUnitOfWork(boss, db, { orderId: 2 })
      seenInside = await queued() // another connection: not committed yet
    })
    expect(seenInside).toBe(0)
    expect(await queued()).toBe(1)
    await expectNoLeaks(scope)
  })
})

// Review probe (session 6): examples/README.md, "a thrown error rolls the job's unit of work
// back and lets pg-boss retry it" (and queue.ts: "ROLLBACK when it throws (pg-boss then
// retries the job)").
describe('workOrders: a handler that throws', () => {
  it("rolls the job's unit of work back, and pg-boss retries it: the retry finds the order still new", async () => {
    // workOrders calls the top-level runJob(): it needs a default scope of its own.
    const pool = new pg.Pool({ connectionString: url, max: 2 })
    const jobScope = createScope({ driver: kyselyDriver(new PostgresDialect({ pool }), { pool }) })
    const orders = createOrders(scopedKysely<DB>(jobScope))
    const boss = new PgBoss({ connectionString: url, max: 2 })
    await boss.start()
    await boss.createQueue(QUEUE)
    await independentQuery(url, 'DELETE FROM pgboss.job WHERE name = $1', [QUEUE])
    try {
      const created = await jobScope.run(async () =>
        orders.create({ customer: 'retry', items: [{ sku: 'A', quantity: 1, priceCents: 100 }] }),
      )
      let attempts = 0
      const crashesOnce: Orders = {
        ...orders,
        async processOne(id, o) {
          attempts++
          const processed = await orders.processOne(id, o)
          if (attempts === 1) throw new Error('crashed after processing (simulated)')
          return processed
        },
      }
      const jobId = await boss.send(
        QUEUE,
        { orderId: created.id },
        { retryLimit: 1, retryDelay: 0 },
      )
      const logs: string[] = []
      await workOrders(boss, crashesOnce, { worker: 'probe', workMs: 0, log: (l) => logs.push(l) })
      const deadline = Date.now() + 30_000
      let job: { state: string; retry_count: number } | undefined
      while (Date.now() < deadline) {
        ;[job] = await independentQuery<{ state: string; retry_count: number }>(
          url,
          'SELECT state, retry_count FROM pgboss.job WHERE id = $1',
          [jobId],
        )
        if (job?.state === 'completed' || job?.state === 'failed') break
        await new Promise((r) => setTimeout(r, 100))
      }
      expect(job).toEqual({ state: 'completed', retry_count: 1 })
      expect(attempts).toBe(2)
      // The first attempt's UPDATE was rolled back: the retry processed the order itself.
      expect(logs.filter((l) => l.includes(`order ${created.id} `))).toEqual([
        expect.stringMatching(new RegExp(`order ${created.id} processed$`)),
      ])
      const [row] = await independentQuery(
        url,
        'SELECT status, processed_by FROM orders WHERE id = $1',
        [created.id],
      )
      expect(row).toEqual({ status: 'processed', processed_by: 'probe' })
      await expectNoLeaks(jobScope)
    } finally {
      await boss.stop({ graceful: false })
      await jobScope.close()
    }
  }, 60_000)
})
