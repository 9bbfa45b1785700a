/**
 * `pnpm start`: the orders service on Express 5, on an embedded PostgreSQL
 * unless DATABASE_URL is set. Listens on PORT (default: a free port) and prints its URL.
 */
import type { AddressInfo } from 'node:net'
import { createOrders, createSchema, type DB, openDatabase } from '@examples/shared'
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
const server = app.listen(Number(process.env.PORT ?? 0), process.env.HOST ?? '127.0.0.1', () => {
  const { address, port } = server.address() as AddressInfo
  console.log(`orders service (express) listening on http://${address}:${port}`)
  console.log(`  try: curl http://${address}:${port}/orders   ·   holders page: /scoped`)
})

let stopping = false
async function shutdown(signal: string) {
  if (stopping) return
  stopping = true
  console.log(`${signal}: closing the server, then the scope (open requests finish first)`)
  await new Promise<void>((resolve) => server.close(() => resolve()))
  app.dispose()
  await scope.close()
  await database.stop()
  console.log('stopped')
}
// once: a second Ctrl-C is not caught, and ends the process at once.
process.once('SIGINT', () => void shutdown('SIGINT'))
process.once('SIGTERM', () => void shutdown('SIGTERM'))
