/**
 * The same orders service written the way the leak reports show it: a
 * connection checked out by hand, `release()` at the end of the happy path,
 * no `try`/`finally`. Every request that throws keeps its connection, inside
 * an open transaction, forever (the Flask/SQLAlchemy "forgot to close on
 * error" leak, or node-postgres's `pool.connect()` without `finally`).
 *
 * `connect` is where the connection comes from: `pool.connect()` itself, or
 * (for the third part of the demo) a checkout through a scope that the naive
 * code never ends.
 */
import { parseOrderInput } from '@examples/shared'
import { Hono } from 'hono'

export interface NaiveClient {
  query(text: string, values?: unknown[]): Promise<{ rows: any[] }>
  release(): void
}

/** `name` is the route; `pool.connect()` ignores it, a scope names its session with it. */
export type Connect = (name: string) => Promise<NaiveClient>

export function createNaiveApp(connect: Connect, logError: (error: unknown) => void): Hono {
  const app = new Hono()
  const route = (c: { req: { method: string; routePath: string } }) =>
    `${c.req.method} ${c.req.routePath}`

  const insertOrder = async (client: NaiveClient, body: unknown) => {
    const input = parseOrderInput(body)
    const total = input.items.reduce((sum, i) => sum + i.quantity * i.priceCents, 0)
    const { rows } = await client.query(
      'INSERT INTO orders (customer, total_cents) VALUES ($1, $2) RETURNING *',
      [input.customer, total],
    )
    for (const item of input.items) {
      await client.query(
        'INSERT INTO order_items (order_id, sku, quantity, price_cents) VALUES ($1, $2, $3, $4)',
        [rows[0].id, item.sku, item.quantity, item.priceCents],
      )
    }
    return rows[0]
  }

  app.post('/orders', async (c) => {
    const body = await c.req.json().catch(() => undefined)
    const client = await connect(route(c))
    await client.query('BEGIN')
    const order = await insertOrder(client, body) // an invalid body throws here: leaked
    await client.query('COMMIT')
    client.release()
    return c.json(order, 201)
  })

  app.post('/orders/fail-halfway', async (c) => {
    const body = await c.req.json().catch(() => undefined)
    const client = await connect(route(c))
    await client.query('BEGIN')
    const order = await insertOrder(client, body)
    throw new Error(`payment provider unavailable after order ${order.id} was written (simulated)`)
    // never reached: no COMMIT, no ROLLBACK, no release()
  })

  app.get('/orders/summary', async (c) => {
    const client = await connect(route(c))
    await client.query('SELECT pg_sleep($1)', [Number(c.req.query('slowMs') ?? 0) / 1000])
    const { rows } = await client.query(
      "SELECT count(*)::int AS orders, count(*) FILTER (WHERE status = 'new')::int AS new FROM orders",
    )
    client.release()
    return c.json(rows[0])
  })

  app.get('/orders/export', async (c) => {
    const client = await connect(route(c))
    const { rows } = await client.query('SELECT * FROM orders ORDER BY id LIMIT $1', [
      Number(c.req.query('limit') ?? 200),
    ])
    client.release()
    return c.body(rows.map((r) => `${JSON.stringify(r)}\n`).join(''), 200, {
      'content-type': 'application/x-ndjson',
    })
  })

  app.get('/orders', async (c) => {
    const client = await connect(route(c))
    const { rows } = await client.query(
      'SELECT * FROM orders WHERE status = $1 ORDER BY id DESC LIMIT 50',
      [c.req.query('status') ?? 'new'],
    )
    client.release()
    return c.json(rows)
  })

  app.get('/orders/:id', async (c) => {
    const client = await connect(route(c))
    const { rows } = await client.query('SELECT * FROM orders WHERE id = $1', [
      Number(c.req.param('id')),
    ])
    client.release()
    return rows[0] ? c.json(rows[0]) : c.json({ error: 'no such order' }, 404)
  })

  app.onError((err, c) => {
    logError(err)
    const status = (err as { status?: number }).status ?? 500
    return c.json({ error: err.message }, status === 400 ? 400 : 500)
  })
  return app
}
