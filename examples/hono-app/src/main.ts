/**
 * `pnpm start`: the orders service on Hono, on an embedded PostgreSQL unless
 * DATABASE_URL is set. Listens on PORT (default: a free port) and prints its URL.
 */

import { createOrders, createSchema, type DB, openDatabase } from '@examples/shared'
import { serve } from '@hono/node-server'
import { createScope } from '@scoped/core'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import { PostgresDialect } from 'kysely'
import pg from 'pg'
import Cursor from 'pg-cursor'
import { createApp } from './app.ts'

const database = await openDatabase()

// The whole database setup of the app: one pool, one scope over it, one `db`.
const pool = new pg.Pool({
  connectionString: database.url,
  max: 10,
  application_name: 'orders-app',
})
const dialect = new PostgresDialect({ pool, cursor: Cursor })
const scope = createScope({
  driver: kyselyDriver(dialect, { pool }),
  name: 'orders-db',
  acquireTimeoutMs: 5_000,
})
const db = scopedKysely<DB>(scope)
const orders = createOrders(db)

await scope.run(() => createSchema(db), { name: 'migrate' })

const app = createApp({ scope, orders })
const server = serve(
  {
    fetch: app.fetch,
    hostname: process.env.HOST ?? '127.0.0.1',
    port: Number(process.env.PORT ?? 0),
  },
  (info) => {
    console.log(`orders service (hono) listening on http://${info.address}:${info.port}`)
    console.log(
      `  try: curl http://${info.address}:${info.port}/orders   ·   holders page: /scoped   ·   metrics: /metrics`,
    )
  },
)

let stopping = false
async function shutdown(signal: string) {
  if (stopping) return
  stopping = true
  console.log(`${signal}: closing the server, then the scope (open requests finish first)`)
  await new Promise<void>((resolve) => server.close(() => resolve()))
  await app.dispose()
  await scope.close()
  await database.stop()
  console.log('stopped')
}
// once: a second Ctrl-C is not caught, and ends the process at once.
process.once('SIGINT', () => void shutdown('SIGINT'))
process.once('SIGTERM', () => void shutdown('SIGTERM'))
