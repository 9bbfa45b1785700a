/**
 * The orders service on Express 5. The `scopedSession` middleware gives every
 * request its own scoped session: the handlers use the app-wide `orders` (a
 * Kysely `db` underneath) and never see a connection, a transaction or a release.
 */
import { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { type Orders, parseOrderInput } from '@examples/shared'
import type { Scope } from '@scoped/core'
import { holdersPage } from '@scoped/core/page'
import { scopedSession } from '@scoped/express'
import express, { type ErrorRequestHandler, type Express } from 'express'

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

export function createApp({
  scope,
  orders,
  logError = console.error,
}: AppOptions): Express & { dispose(): void } {
  const app = express()
  const page = holdersPage(scope)

  // One unit of work per request: COMMIT before the response ends when the
  // handler succeeded (status < 500), ROLLBACK on a throw, a 5xx or a client
  // that left. Mounted first, so the body parser runs inside the scope too.
  app.use(scopedSession(scope, { cancelOnAbort: true }))
  app.use(express.json())

  app.get('/orders', async (req, res) => {
    const { status } = req.query
    if (status !== undefined && status !== 'new' && status !== 'processed') {
      res.status(400).json({ error: "status: expected 'new' or 'processed'" })
      return
    }
    res.json(await orders.list(status ? { status } : {}))
  })

  // Streamed: the session (and its connection) stays until res.end(), which waits for the COMMIT.
  // pipeline() waits for 'drain', and stops the rows (closing the cursor) if the client leaves:
  // a hand-written `await once(res, 'drain')` would wait forever on a destroyed socket.
  app.get('/orders/export', async (req, res) => {
    const { limit } = req.query
    res.type('application/x-ndjson')
    const rows = orders.exportAll(limit ? { limit: Number(limit) } : {})
    await pipeline(Readable.from(ndjson(rows)), res)
  })

  app.get('/orders/summary', async (req, res) => {
    const slowMs = Math.min(Number(req.query.slowMs ?? 0) || 0, 10_000)
    res.json(await orders.summary({ slowMs }))
  })

  app.get('/orders/:id', async (req, res) => {
    const id = orderId(req.params.id)
    const order = id === undefined ? undefined : await orders.get(id)
    if (order) res.json(order)
    else res.status(404).json({ error: 'no such order' })
  })

  // Two INSERTs (the order, its line items) in the request's one transaction.
  app.post('/orders', async (req, res) => {
    const order = await orders.create(parseOrderInput(req.body))
    res.status(201).json(order)
  })

  // Writes the order and its items, then fails: the rollback leaves no trace of either.
  app.post('/orders/fail-halfway', async (req) => {
    const order = await orders.create(parseOrderInput(req.body))
    throw new Error(`payment provider unavailable after order ${order.id} was written (simulated)`)
  })

  // Operators only: mount it behind your admin authentication in a real service.
  app.get('/scoped', (_req, res) => {
    res.type('html').send(page.html())
  })

  const onError: ErrorRequestHandler = (error, req, res, _next) => {
    const status = (error as { status?: number }).status ?? 500
    if (status < 500) {
      res.status(status).json({ error: (error as Error).message })
      return
    }
    logError(error, `${req.method} ${req.route?.path ?? req.path}`)
    if (res.headersSent) {
      res.destroy()
      return
    }
    res.status(500).json({ error: error instanceof Error ? error.message : String(error) })
  }
  app.use(onError)

  return Object.assign(app, {
    /** Stop the holders page's sampler. */
    dispose: () => page.stop(),
  })
}

/** One JSON line per row. */
async function* ndjson(rows: AsyncIterable<unknown>): AsyncGenerator<string> {
  for await (const row of rows) yield `${JSON.stringify(row)}\n`
}
