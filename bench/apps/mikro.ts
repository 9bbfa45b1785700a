/**
 * The benchmark tables as MikroORM entities (EntitySchema, no decorators).
 *
 * MikroORM is installed for packages/mikro-orm only, so it is loaded at run
 * time from there — the same files the bundled @scoped/mikro-orm imports
 * (bench/lib/bundle.ts resolves them the same way) — and typed here by the
 * little the benchmark uses.
 */
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { esmEntry } from '../lib/resolve-esm.ts'

export interface EntityManager {
  findOne(entity: unknown, id: number): Promise<any>
  create(entity: unknown, data: Record<string, unknown>): any
  flush(): Promise<void>
  transactional<T>(fn: (em: EntityManager) => Promise<T>): Promise<T>
  getConnection(type: 'write'): { getKnex(): any }
}

export interface Orm {
  em: EntityManager
}

export interface Mikro {
  orm: Orm
  /** The Order entity class, for findOne/create. */
  Order: unknown
  /** `RequestContext.create(orm.em, next)`: MikroORM's own request scope. */
  requestContext<T>(next: () => T): T
}

/** Two levels up from bench/apps/ (or from the bundle in .tmp/bench/): the workspace. */
const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..')

async function load(spec: string): Promise<any> {
  const entry = esmEntry(spec, join(root, 'packages', 'mikro-orm'))
  if (!entry) throw new Error(`${spec} is not installed (pnpm install in packages/mikro-orm)`)
  return import(pathToFileURL(entry).href)
}

/** A MikroORM over the benchmark database with a pool of `max`, and its entities. */
export async function initMikro(url: string, max: number): Promise<Mikro> {
  const { Collection, EntitySchema, RequestContext } = await load('@mikro-orm/core')
  const { MikroORM } = await load('@mikro-orm/postgresql')

  class Order {
    id!: number
    customer!: string
    total!: string
    createdAt?: Date
    items = new Collection(this)
  }
  class OrderItem {
    id!: number
    order!: Order
    sku!: string
    qty!: number
    price!: string
  }
  const OrderSchema = new EntitySchema({
    class: Order,
    tableName: 'orders',
    properties: {
      id: { type: 'number', primary: true, autoincrement: true },
      customer: { type: 'string' },
      total: { type: 'decimal' },
      createdAt: { type: 'Date', fieldName: 'created_at', defaultRaw: 'now()', nullable: true },
      items: { kind: '1:m', entity: () => OrderItem, mappedBy: 'order' },
    },
  })
  const OrderItemSchema = new EntitySchema({
    class: OrderItem,
    tableName: 'order_items',
    properties: {
      id: { type: 'number', primary: true, autoincrement: true },
      order: { kind: 'm:1', entity: () => Order, fieldName: 'order_id' },
      sku: { type: 'string' },
      qty: { type: 'number' },
      price: { type: 'decimal' },
    },
  })
  const orm = (await MikroORM.init({
    clientUrl: url,
    entities: [OrderSchema, OrderItemSchema],
    pool: { min: 0, max },
    discovery: { warnWhenNoEntities: false },
    debug: false,
  })) as Orm
  return {
    orm,
    Order,
    requestContext: (next) => RequestContext.create(orm.em, next),
  }
}
