/**
 * The orders schema: the Kysely types and the DDL that creates it.
 */
import { type ColumnType, type Generated, type Kysely, sql } from 'kysely'

export type OrderStatus = 'new' | 'processed'

export interface OrdersTable {
  id: Generated<number>
  customer: string
  status: ColumnType<OrderStatus, OrderStatus | undefined, OrderStatus>
  total_cents: number
  created_at: ColumnType<Date, never, never>
  processed_at: ColumnType<Date | null, never, Date | null>
  processed_by: string | null
}

export interface OrderItemsTable {
  id: Generated<number>
  order_id: number
  sku: string
  quantity: number
  price_cents: number
}

/** The database, as Kysely sees it: `scopedKysely<DB>(scope)`. */
export interface DB {
  orders: OrdersTable
  order_items: OrderItemsTable
}

/**
 * Create the tables if they are missing. Run it inside a scope
 * (`scope.run(() => createSchema(db))`): it is one unit of work, and the
 * advisory lock (released at COMMIT) keeps an app and a worker that start
 * together from racing on `CREATE TABLE IF NOT EXISTS`.
 */
export async function createSchema(db: Kysely<DB>): Promise<void> {
  await sql`SELECT pg_advisory_xact_lock(hashtext('examples.orders.schema'))`.execute(db)
  await sql`
    CREATE TABLE IF NOT EXISTS orders (
      id serial PRIMARY KEY,
      customer text NOT NULL,
      status text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'processed')),
      total_cents integer NOT NULL CHECK (total_cents >= 0),
      created_at timestamptz NOT NULL DEFAULT now(),
      processed_at timestamptz,
      processed_by text
    )`.execute(db)
  await sql`
    CREATE TABLE IF NOT EXISTS order_items (
      id serial PRIMARY KEY,
      order_id integer NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
      sku text NOT NULL,
      quantity integer NOT NULL CHECK (quantity > 0),
      price_cents integer NOT NULL CHECK (price_cents >= 0)
    )`.execute(db)
  await sql`CREATE INDEX IF NOT EXISTS order_items_order_id ON order_items (order_id)`.execute(db)
  await sql`CREATE INDEX IF NOT EXISTS orders_new ON orders (id) WHERE status = 'new'`.execute(db)
}
