/**
 * `pnpm start`: order processing on pg-boss, on an embedded PostgreSQL unless
 * DATABASE_URL is set. At start it enqueues a job for every new order (in one
 * unit of work: the orders are read and the jobs sent through the same
 * connection), then works the queue; each job's handler runs in `runJob`.
 *
 * SIGINT/SIGTERM: pg-boss stops fetching and waits for the jobs in progress,
 * then the scope closes its pool and the process exits 0.
 *
 * Environment: WORK_MS (simulated work per order, default 0).
 */
import { createOrders, createSchema, type DB, openDatabase, sampleOrder } from '@examples/shared'
import { createScope, runJob } from '@scoped/core'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import { PostgresDialect } from 'kysely'
import pg from 'pg'
import PgBoss from 'pg-boss'
import { QUEUE, sendInUnitOfWork, workOrders } from './queue.ts'

const worker = `pg-boss-${process.pid}`
const database = await openDatabase()

const pool = new pg.Pool({
  connectionString: database.url,
  max: 4,
  application_name: 'orders-pg-boss',
})
const dialect = new PostgresDialect({ pool })
const scope = createScope({ driver: kyselyDriver(dialect, { pool }), name: 'orders-pg-boss' })
const db = scopedKysely<DB>(scope)
const orders = createOrders(db)

await scope.run(() => createSchema(db), { name: 'migrate' })
if (database.embedded) {
  await scope.run(
    async () => {
      for (let i = 0; i < 20; i++) await orders.create(sampleOrder(i))
    },
    { name: 'seed' },
  )
  console.log('seeded 20 sample orders')
}

// pg-boss keeps its own small pool for fetching and completing jobs.
const boss = new PgBoss({ connectionString: database.url, max: 2, application_name: 'pg-boss' })
boss.on('error', (error) => console.error('[pg-boss]', error))
await boss.start()
await boss.createQueue(QUEUE)

// Backfill: one job per new order, sent in the same unit of work that reads them.
const queued = await runJob(
  async () => {
    const news = await orders.list({ status: 'new', limit: 10_000 })
    for (const order of news) await sendInUnitOfWork(boss, db, { orderId: order.id })
    return news.length
  },
  { name: 'enqueue-new-orders' },
)
console.log(`enqueued ${queued} new orders on '${QUEUE}'`)

await workOrders(boss, orders, {
  worker,
  workMs: Number(process.env.WORK_MS ?? 0),
  log: (line) => console.log(line),
})
console.log(`${worker} started: working '${QUEUE}' (stop with Ctrl-C or SIGTERM)`)

let stopping = false
async function shutdown(signal: string) {
  if (stopping) return
  stopping = true
  console.log(`${signal}: pg-boss stops fetching and waits for the jobs in progress`)
  await boss.stop({ graceful: true, wait: true, timeout: 30_000 })
  await scope.close()
  await database.stop()
  console.log(`${worker} stopped`)
}
// once: a second Ctrl-C is not caught, and ends the process at once.
process.once('SIGINT', () => void shutdown('SIGINT'))
process.once('SIGTERM', () => void shutdown('SIGTERM'))
