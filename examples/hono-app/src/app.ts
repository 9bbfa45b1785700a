/**
 * The orders service on Hono. Every request runs in its own scoped session
 * (`scopedSession`): the handlers just use the app-wide `orders` (a Kysely
 * `db` underneath) and never see a connection, a transaction or a release.
 */
import { InvalidOrderError, type Orders, parseOrderInput } from '@examples/shared'
import type { Scope } from '@scoped/core'
import { holdersPage } from '@scoped/core/page'
import { scopedSession } from '@scoped/hono'
import { Hono } from 'hono'
import { stream } from 'hono/streaming'
import { prometheusMetrics } from './metrics.ts'

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

export function createApp({ scope, orders, logError = console.error }: AppOptions) {
  const app = new Hono()
  const page = holdersPage(scope)
  const metrics = prometheusMetrics(scope)

  // One unit of work per request: COMMIT before the response when the handler
  // succeeded (status < 500), ROLLBACK on a throw, a 5xx or a client that left.
  // cancelOnAbort: a client that leaves also stops its running statement.
  app.use(scopedSession(scope, { cancelOnAbort: true }))

  app.get('/orders', async (c) => {
    const status = c.req.query('status')
    if (status !== undefined && status !== 'new' && status !== 'processed') {
      return c.json({ error: "status: expected 'new' or 'processed'" }, 400)
    }
    return c.json(await orders.list(status ? { status } : {}))
  })

  // Streamed: the session (and its connection) stays until the last row is written.
  app.get('/orders/export', (c) => {
    const limit = c.req.query('limit')
    c.header('content-type', 'application/x-ndjson')
    return stream(c, async (body) => {
      for await (const order of orders.exportAll(limit ? { limit: Number(limit) } : {})) {
        await body.write(`${JSON.stringify(order)}\n`)
      }
    })
  })

  app.get('/orders/summary', async (c) => {
    const slowMs = Math.min(Number(c.req.query('slowMs') ?? 0) || 0, 10_000)
    return c.json(await orders.summary({ slowMs }))
  })

  app.get('/orders/:id', async (c) => {
    const id = orderId(c.req.param('id'))
    const order = id === undefined ? undefined : await orders.get(id)
    return order ? c.json(order) : c.json({ error: 'no such order' }, 404)
  })

  // Two INSERTs (the order, its line items) in the request's one transaction.
  app.post('/orders', async (c) => {
    const input = parseOrderInput(await c.req.json().catch(() => undefined))
    return c.json(await orders.create(input), 201)
  })

  // Writes the order and its items, then fails: the rollback leaves no trace of either.
  app.post('/orders/fail-halfway', async (c) => {
    const input = parseOrderInput(await c.req.json().catch(() => undefined))
    const order = await orders.create(input)
    throw new Error(`payment provider unavailable after order ${order.id} was written (simulated)`)
  })

  // Operators only: mount these behind your admin authentication in a real service.
  app.get('/metrics', async (c) =>
    c.text(await metrics.scrape(), 200, { 'content-type': 'text/plain; version=0.0.4' }),
  )
  app.get('/scoped', (c) => c.html(page.html()))
  app.get('/scoped.json', (c) => c.json(page.snapshot()))

  app.onError((err, c) => {
    if (err instanceof InvalidOrderError) return c.json({ error: err.message }, 400)
    logError(err, `${c.req.method} ${c.req.routePath}`)
    return c.json({ error: err instanceof Error ? err.message : String(err) }, 500)
  })

  return Object.assign(app, {
    /** Stop the page's sampler and the metrics. */
    async dispose() {
      page.stop()
      await metrics.stop()
    },
  })
}
