/**
 * The orders data layer. Every function runs its statements through the one
 * application-wide `db` (a `scopedKysely`), so they all join the unit of work
 * of whatever request or job calls them: no transaction object is passed in,
 * and nothing here commits, rolls back or releases.
 */
import { setTimeout as sleep } from 'node:timers/promises'
import { type Kysely, type Selectable, sql } from 'kysely'
import type { OrderInput } from './input.ts'
import type { DB, OrderItemsTable, OrderStatus, OrdersTable } from './schema.ts'

export interface OrderItem {
  sku: string
  quantity: number
  priceCents: number
}

export interface Order {
  id: number
  customer: string
  status: OrderStatus
  totalCents: number
  createdAt: string
  processedAt: string | null
  processedBy: string | null
}

export interface OrderWithItems extends Order {
  items: OrderItem[]
}

export interface OrdersSummary {
  orders: number
  new: number
  processed: number
  revenueCents: number
}

export interface Orders {
  /** The newest orders first, optionally of one status. */
  list(opts?: { status?: OrderStatus; limit?: number }): Promise<Order[]>
  /** One order with its items, or undefined. */
  get(id: number): Promise<OrderWithItems | undefined>
  /** Insert the order and its line items: two statements, one unit of work. */
  create(input: OrderInput): Promise<OrderWithItems>
  /** Every order, oldest first, read through a server-side cursor as the caller consumes it. */
  exportAll(opts?: { limit?: number }): AsyncIterable<Order>
  /** Counts and revenue; `slowMs` makes it a slow report (a `pg_sleep` first), to have something to abort. */
  summary(opts?: { slowMs?: number }): Promise<OrdersSummary>
  /**
   * Claim up to `limit` new orders (`FOR UPDATE SKIP LOCKED`, so workers never
   * take the same order), do the work for each, and mark them processed. The
   * row locks are held until the caller's unit of work ends.
   */
  processNew(opts: {
    worker: string
    limit?: number
    workMs?: number
    onClaim?: (ids: number[]) => void
  }): Promise<number[]>
  /** Process one order by id (for a queue's job); false when it is gone or already processed. */
  processOne(id: number, opts: { worker: string; workMs?: number }): Promise<boolean>
}

function toOrder(row: Selectable<OrdersTable>): Order {
  return {
    id: row.id,
    customer: row.customer,
    status: row.status,
    totalCents: row.total_cents,
    createdAt: row.created_at.toISOString(),
    processedAt: row.processed_at?.toISOString() ?? null,
    processedBy: row.processed_by,
  }
}

function toItem(
  row: Pick<Selectable<OrderItemsTable>, 'sku' | 'quantity' | 'price_cents'>,
): OrderItem {
  return { sku: row.sku, quantity: row.quantity, priceCents: row.price_cents }
}

/**
 * The orders functions over an application's `db`.
 *
 * @example
 * ```ts
 * export const db = scopedKysely<DB>(scope)
 * export const orders = createOrders(db)
 *
 * app.post('/orders', async (c) => c.json(await orders.create(parseOrderInput(await c.req.json())), 201))
 * ```
 */
export function createOrders(db: Kysely<DB>): Orders {
  const itemsOf = async (orderId: number) =>
    (
      await db
        .selectFrom('order_items')
        .select(['sku', 'quantity', 'price_cents'])
        .where('order_id', '=', orderId)
        .orderBy('id')
        .execute()
    ).map(toItem)

  // The "work" of processing an order: its total recomputed from the items (and,
  // with workMs, a pause standing for a call to a payment or shipping service).
  const finish = async (id: number, worker: string, workMs: number) => {
    if (workMs > 0) await sleep(workMs)
    await db
      .updateTable('orders')
      .set({
        status: 'processed',
        processed_at: new Date(),
        processed_by: worker,
        total_cents: (eb) =>
          eb
            .selectFrom('order_items')
            .select(sql<number>`coalesce(sum(quantity * price_cents), 0)::int`.as('total'))
            .where('order_id', '=', id),
      })
      .where('id', '=', id)
      .execute()
  }

  return {
    async list({ status, limit = 50 } = {}) {
      let q = db.selectFrom('orders').selectAll().orderBy('id', 'desc').limit(limit)
      if (status) q = q.where('status', '=', status)
      return (await q.execute()).map(toOrder)
    },

    async get(id) {
      const row = await db.selectFrom('orders').selectAll().where('id', '=', id).executeTakeFirst()
      if (!row) return undefined
      return { ...toOrder(row), items: await itemsOf(id) }
    },

    async create(input) {
      const total = input.items.reduce((sum, i) => sum + i.quantity * i.priceCents, 0)
      const row = await db
        .insertInto('orders')
        .values({ customer: input.customer, total_cents: total })
        .returningAll()
        .executeTakeFirstOrThrow()
      const items = await db
        .insertInto('order_items')
        .values(
          input.items.map((i) => ({
            order_id: row.id,
            sku: i.sku,
            quantity: i.quantity,
            price_cents: i.priceCents,
          })),
        )
        .returning(['sku', 'quantity', 'price_cents'])
        .execute()
      return { ...toOrder(row), items: items.map(toItem) }
    },

    async *exportAll({ limit } = {}) {
      let q = db.selectFrom('orders').selectAll().orderBy('id')
      if (limit !== undefined) q = q.limit(limit)
      for await (const row of q.stream(100)) yield toOrder(row)
    },

    async summary({ slowMs = 0 } = {}) {
      if (slowMs > 0) await sql`SELECT pg_sleep(${slowMs / 1000})`.execute(db)
      const row = await db
        .selectFrom('orders')
        .select([
          sql<number>`count(*)::int`.as('orders'),
          sql<number>`count(*) FILTER (WHERE status = 'new')::int`.as('new'),
          sql<number>`count(*) FILTER (WHERE status = 'processed')::int`.as('processed'),
          sql<number>`coalesce(sum(total_cents), 0)::int`.as('revenueCents'),
        ])
        .executeTakeFirstOrThrow()
      return row
    },

    async processNew({ worker, limit = 10, workMs = 0, onClaim }) {
      const claimed = await db
        .selectFrom('orders')
        .select('id')
        .where('status', '=', 'new')
        .orderBy('id')
        .limit(limit)
        .forUpdate()
        .skipLocked()
        .execute()
      const ids = claimed.map((r) => r.id)
      if (ids.length > 0) onClaim?.(ids)
      for (const id of ids) await finish(id, worker, workMs)
      return ids
    },

    async processOne(id, { worker, workMs = 0 }) {
      const row = await db
        .selectFrom('orders')
        .select('status')
        .where('id', '=', id)
        .forUpdate()
        .executeTakeFirst()
      // Queues deliver at least once: a job for an order already processed is a no-op.
      if (row?.status !== 'new') return false
      await finish(id, worker, workMs)
      return true
    },
  }
}
