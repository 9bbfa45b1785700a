/**
 * The benchmarks' data: orders and their items, the same tables for every
 * library (hand-written SQL, Kysely, MikroORM).
 */
import type { Generated } from 'kysely'
import pg from 'pg'

export const ORDERS = 10_000

export const DDL = `
CREATE TABLE orders (
  id serial PRIMARY KEY,
  customer text NOT NULL,
  total numeric(12, 2) NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE order_items (
  id serial PRIMARY KEY,
  order_id int NOT NULL REFERENCES orders (id),
  sku text NOT NULL,
  qty int NOT NULL,
  price numeric(12, 2) NOT NULL
);
CREATE INDEX order_items_order_id ON order_items (order_id);
INSERT INTO orders (customer, total)
  SELECT 'customer ' || g, (g % 1000) + 0.99 FROM generate_series(1, ${ORDERS}) g;
ANALYZE;
`

/** Create the tables and rows in the (empty) database at `url`. */
export async function seed(url: string): Promise<void> {
  const c = new pg.Client({ connectionString: url })
  await c.connect()
  try {
    await c.query(DDL)
  } finally {
    await c.end()
  }
}

/** The body of `POST /orders`: one order and three items, written in one transaction. */
export interface NewOrder {
  customer: string
  items: { sku: string; qty: number; price: number }[]
}

export const newOrder: NewOrder = {
  customer: 'bench customer',
  items: [
    { sku: 'sku-1', qty: 1, price: 9.99 },
    { sku: 'sku-2', qty: 2, price: 19.5 },
    { sku: 'sku-3', qty: 3, price: 4.25 },
  ],
}

export function totalOf(order: NewOrder): number {
  return order.items.reduce((sum, i) => sum + i.qty * i.price, 0)
}

/** Kysely's view of the tables. */
export interface DB {
  orders: { id: Generated<number>; customer: string; total: string; created_at: Generated<Date> }
  order_items: {
    id: Generated<number>
    order_id: number
    sku: string
    qty: number
    price: string | number
  }
}

export const SELECT_ORDER = 'SELECT id, customer, total, created_at FROM orders WHERE id = $1'
export const INSERT_ORDER = 'INSERT INTO orders (customer, total) VALUES ($1, $2) RETURNING id'

/** One multi-row INSERT of an order's items: its text and its parameters. */
export function insertItems(orderId: number, order: NewOrder): { text: string; values: unknown[] } {
  const values: unknown[] = []
  const rows = order.items.map((item) => {
    values.push(orderId, item.sku, item.qty, item.price)
    const n = values.length
    return `($${n - 3}, $${n - 2}, $${n - 1}, $${n})`
  })
  return {
    text: `INSERT INTO order_items (order_id, sku, qty, price) VALUES ${rows.join(', ')}`,
    values,
  }
}
