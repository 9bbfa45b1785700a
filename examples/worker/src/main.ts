/**
 * `pnpm start`: a worker that processes new orders forever, on an embedded
 * PostgreSQL unless DATABASE_URL is set. Each iteration of `loop()` is its own
 * job: its own session and unit of work, committed when it returns.
 *
 * SIGINT/SIGTERM stop the loop after the current iteration (its job finishes
 * and commits), then the scope closes the pool and the process exits 0.
 *
 * Environment: BATCH (orders per iteration, default 10), WORK_MS (simulated
 * work per order, default 0), INTERVAL_MS (pause between iterations, default 100).
 */
import { createOrders, createSchema, type DB, openDatabase, sampleOrder } from '@examples/shared'
import { createScope } from '@scoped/core'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import { PostgresDialect } from 'kysely'
import pg from 'pg'
import { processNewOrders } from './process-new-orders.ts'

const env = (name: string, dflt: number) => Number(process.env[name] ?? dflt)
const worker = `worker-${process.pid}`

const database = await openDatabase()

const pool = new pg.Pool({
  connectionString: database.url,
  max: 2,
  application_name: 'orders-worker',
})
const dialect = new PostgresDialect({ pool })
const scope = createScope({ driver: kyselyDriver(dialect, { pool }), name: 'orders-worker' })
const db = scopedKysely<DB>(scope)
const orders = createOrders(db)

await scope.run(() => createSchema(db), { name: 'migrate' })
if (database.embedded) {
  // A fresh database: give the worker something to do.
  await scope.run(
    async () => {
      for (let i = 0; i < 20; i++) await orders.create(sampleOrder(i))
    },
    { name: 'seed' },
  )
  console.log('seeded 20 sample orders')
}

const stop = new AbortController()
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    console.log(`${signal}: stopping after the current iteration`)
    stop.abort()
  })
}

console.log(`${worker} started: processing new orders (stop with Ctrl-C or SIGTERM)`)
await processNewOrders(orders, {
  worker,
  batch: env('BATCH', 10),
  workMs: env('WORK_MS', 0),
  intervalMs: env('INTERVAL_MS', 100),
  signal: stop.signal,
  log: (line) => console.log(line),
})

// loop() returned: the last iteration finished (and committed). Close the pool.
await scope.close()
await database.stop()
console.log(`${worker} stopped`)
