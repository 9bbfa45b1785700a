/**
 * The orders service on Fastify. The `scopedSession` plugin gives every
 * request its own scoped session: the handlers use the app-wide `orders` (a
 * Kysely `db` underneath) and never see a connection, a transaction or a release.
 */
import { Readable } from 'node:stream'
import { type Orders, parseOrderInput } from '@examples/shared'
import type { Scope } from '@scoped/core'
import { holdersPage } from '@scoped/core/page'
import { scopedSession } from '@scoped/fastify'
import Fastify from 'fastify'

export interface AppOptions {
  scope: Scope<any>
  orders: Orders
  /** Where unexpected errors (the 500s) are logged. Default: console.error. */
  logError?: (error: unknown, route: string) => void
}

function orderId(raw: string): number | undefined {
  const id = Number(raw)
  return Number.isSafeInteger(id) && id > 0 && id < 2 ** 31 ? id : undefined
}

async function* ndjson(rows: AsyncIterable<unknown>): AsyncIterable<string> {
  for await (const row of rows) yield `${JSON.stringify(row)}\n`
}

export async function buildApp({ scope, orders, logError = console.error }: AppOptions) {
  const app = Fastify()
  const page = holdersPage(scope)
  app.addHook('onClose', async () => page.stop())

  // One unit of work per request: COMMIT before the response when the handler
  // succeeded (status < 500), ROLLBACK on a throw, a 5xx or a client that left.
  // Registered (and awaited) before the routes, so it sees every one of them.
  await app.register(scopedSession, { scope, cancelOnAbort: true })

  app.get<{ Querystring: { status?: string } }>('/orders', async (request, reply) => {
    const { status } = request.query
    if (status !== undefined && status !== 'new' && status !== 'processed') {
      return reply.code(400).send({ error: "status: expected 'new' or 'processed'" })
    }
    return orders.list(status ? { status } : {})
  })

  // Streamed: the session (and its connection) stays until the last row is written.
  app.get<{ Querystring: { limit?: string } }>('/orders/export', async (request, reply) => {
    const { limit } = request.query
    const rows = orders.exportAll(limit ? { limit: Number(limit) } : {})
    return reply.type('application/x-ndjson').send(Readable.from(ndjson(rows)))
  })

  app.get<{ Querystring: { slowMs?: string } }>('/orders/summary', async (request) => {
    const slowMs = Math.min(Number(request.query.slowMs ?? 0) || 0, 10_000)
    return orders.summary({ slowMs })
  })

  app.get<{ Params: { id: string } }>('/orders/:id', async (request, reply) => {
    const id = orderId(request.params.id)
    const order = id === undefined ? undefined : await orders.get(id)
    return order ?? reply.code(404).send({ error: 'no such order' })
  })

  // Two INSERTs (the order, its line items) in the request's one transaction.
  app.post('/orders', async (request, reply) => {
    const order = await orders.create(parseOrderInput(request.body))
    return reply.code(201).send(order)
  })

  // Writes the order and its items, then fails: the rollback leaves no trace of either.
  app.post('/orders/fail-halfway', async (request) => {
    const order = await orders.create(parseOrderInput(request.body))
    throw new Error(`payment provider unavailable after order ${order.id} was written (simulated)`)
  })

  // Operators only: mount it behind your admin authentication in a real service.
  app.get('/scoped', async (_request, reply) => reply.type('text/html').send(page.html()))

  app.setErrorHandler((error, request, reply) => {
    const { status, statusCode } = error as { status?: number; statusCode?: number }
    const message = error instanceof Error ? error.message : String(error)
    const code = status ?? statusCode ?? 500
    if (code < 500) return reply.code(code).send({ error: message })
    logError(error, `${request.method} ${request.routeOptions.url}`)
    return reply.code(500).send({ error: message })
  })

  return app
}
