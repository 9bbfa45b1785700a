/**
 * `pnpm start`: the orders service on Fastify, on an embedded PostgreSQL unless
 * DATABASE_URL is set. Listens on PORT (default: a free port) and prints its URL.
 */
import { createOrders, createSchema, type DB, openDatabase } from '@examples/shared'
import { createScope } from '@scoped/core'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import { PostgresDialect } from 'kysely'
import pg from 'pg'
import Cursor from 'pg-cursor'
import { buildApp } from './app.ts'

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

const app = await buildApp({ scope, orders })
const url = await app.listen({
  host: process.env.HOST ?? '127.0.0.1',
  port: Number(process.env.PORT ?? 0),
})
console.log(`orders service (fastify) listening on ${url}`)
console.log(`  try: curl ${url}/orders   ·   holders page: /scoped`)

let stopping = false
async function shutdown(signal: string) {
  if (stopping) return
  stopping = true
  console.log(`${signal}: closing the server, then the scope (open requests finish first)`)
  await app.close()
  await scope.close()
  await database.stop()
  console.log('stopped')
}
// once: a second Ctrl-C is not caught, and ends the process at once.
process.once('SIGINT', () => void shutdown('SIGINT'))
process.once('SIGTERM', () => void shutdown('SIGTERM'))
