/**
 * The shared data layer, tested the way an application tests its own code:
 * each test runs in a unit of work that is always rolled back
 * (`withRollback`), and no test may leave a connection checked out
 * (`expectNoLeaks`).
 */
import { createScope } from '@scoped/core'
import { expectNoLeaks, withRollback } from '@scoped/core/testing'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import { PostgresDialect } from 'kysely'
import pg from 'pg'
import Cursor from 'pg-cursor'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import {
  createOrders,
  createSchema,
  type DB,
  InvalidOrderError,
  parseOrderInput,
  sampleOrder,
} from '../src/index.ts'

let url: string
let pool: pg.Pool
let scope: ReturnType<typeof createScope<any>>
let orders: ReturnType<typeof createOrders>

const input = {
  customer: 'grace',
  items: [
    { sku: 'MUG-1', quantity: 3, priceCents: 800 },
    { sku: 'LAMP-2', quantity: 1, priceCents: 4500 },
  ],
}

async function countRows(table: 'orders' | 'order_items'): Promise<number> {
  return (
    (await independentQuery<{ n: number }>(url, `SELECT count(*)::int AS n FROM ${table}`))[0]?.n ??
    -1
  )
}

beforeAll(async () => {
  url = await testDatabase('example_shared')
  pool = new pg.Pool({ connectionString: url, max: 4 })
  const dialect = new PostgresDialect({ pool, cursor: Cursor })
  scope = createScope({
    driver: kyselyDriver(dialect, { pool }),
    name: 'orders-test',
    default: false,
  })
  const db = scopedKysely<DB>(scope)
  orders = createOrders(db)
  await scope.run(() => createSchema(db), { name: 'migrate' })
})

afterEach(async () => {
  await expectNoLeaks(scope)
})

afterAll(async () => {
  await scope?.close()
})

describe('orders data layer (withRollback: each test leaves the tables as it found them)', () => {
  it('create() writes the order and its items; get() and list() read them back in the same unit of work', async () => {
    await withRollback(scope, async () => {
      const created = await orders.create(input)
      expect(created).toMatchObject({
        customer: 'grace',
        status: 'new',
        totalCents: 6900,
        items: input.items,
      })
      expect(await orders.get(created.id)).toEqual(created)
      expect((await orders.list()).map((o) => o.id)).toEqual([created.id])
      expect(await orders.list({ status: 'processed' })).toEqual([])
      expect(await orders.get(created.id + 1000)).toBeUndefined()
    })
    // Rolled back: nothing reached the tables.
    expect(await countRows('orders')).toBe(0)
    expect(await countRows('order_items')).toBe(0)
  })

  it('list() returns the newest first, limited', async () => {
    await withRollback(scope, async () => {
      const ids: number[] = []
      for (let i = 0; i < 5; i++) ids.push((await orders.create(sampleOrder(i))).id)
      expect((await orders.list({ limit: 3 })).map((o) => o.id)).toEqual(ids.reverse().slice(0, 3))
    })
  })

  it('exportAll() streams every order, oldest first, on the session connection', async () => {
    await withRollback(scope, async () => {
      for (let i = 0; i < 250; i++) await orders.create(sampleOrder(i))
      const seen: number[] = []
      for await (const o of orders.exportAll()) seen.push(o.id)
      expect(seen).toHaveLength(250)
      expect(seen).toEqual([...seen].sort((a, b) => a - b))
      let limited = 0
      for await (const _ of orders.exportAll({ limit: 7 })) limited++
      expect(limited).toBe(7)
    })
  })

  it('summary() counts orders by status and adds up the revenue', async () => {
    await withRollback(scope, async () => {
      const a = await orders.create(input)
      await orders.create({
        customer: 'ken',
        items: [{ sku: 'PEN-3', quantity: 2, priceCents: 150 }],
      })
      await orders.processOne(a.id, { worker: 'test' })
      expect(await orders.summary()).toEqual({
        orders: 2,
        new: 1,
        processed: 1,
        revenueCents: 6900 + 300,
      })
    })
  })

  it('processOne() processes a new order once; a second delivery of the job is a no-op', async () => {
    await withRollback(scope, async () => {
      const { id } = await orders.create(input)
      expect(await orders.processOne(id, { worker: 'w1' })).toBe(true)
      expect(await orders.processOne(id, { worker: 'w2' })).toBe(false)
      expect(await orders.get(id)).toMatchObject({
        status: 'processed',
        processedBy: 'w1',
        totalCents: 6900,
      })
      expect(await orders.processOne(id + 1000, { worker: 'w1' })).toBe(false)
    })
  })

  it('a unit of work that fails half-way leaves nothing, and its connection goes back to the pool', async () => {
    await expect(
      scope.run(async () => {
        await orders.create(input)
        throw new Error('payment provider unavailable')
      }),
    ).rejects.toThrow('payment provider unavailable')
    expect(await countRows('orders')).toBe(0)
    expect(await countRows('order_items')).toBe(0)
    expect(pool.totalCount).toBe(pool.idleCount)
  })
})

describe('processNew() across workers (committed rows: two sessions must see them)', () => {
  afterEach(async () => {
    await independentQuery(url, 'TRUNCATE orders, order_items RESTART IDENTITY')
  })

  it('two concurrent workers claim disjoint orders (FOR UPDATE SKIP LOCKED) and process them all', async () => {
    await scope.run(async () => {
      for (let i = 0; i < 4; i++) await orders.create(sampleOrder(i))
    })
    const [a, b] = await Promise.all([
      scope.run(() => orders.processNew({ worker: 'a', limit: 2, workMs: 200 }), { name: 'job:a' }),
      scope.run(() => orders.processNew({ worker: 'b', limit: 2, workMs: 200 }), { name: 'job:b' }),
    ])
    expect(a).toHaveLength(2)
    expect(b).toHaveLength(2)
    expect(new Set([...(a ?? []), ...(b ?? [])]).size).toBe(4)
    const rows = await independentQuery<{ id: number; processed_by: string }>(
      url,
      "SELECT id, processed_by FROM orders WHERE status = 'processed' ORDER BY id",
    )
    expect(rows.filter((r) => r.processed_by === 'a').map((r) => r.id)).toEqual(a)
    expect(rows.filter((r) => r.processed_by === 'b').map((r) => r.id)).toEqual(b)
  })

  it('a claim that fails rolls back: the orders stay new for the next worker', async () => {
    await scope.run(async () => {
      await orders.create(sampleOrder(1))
    })
    await expect(
      scope.run(async () => {
        await orders.processNew({ worker: 'crashing', onClaim: () => {} })
        throw new Error('worker crashed after processing')
      }),
    ).rejects.toThrow('worker crashed')
    expect(await independentQuery(url, "SELECT id FROM orders WHERE status = 'new'")).toHaveLength(
      1,
    )
    const done = await scope.run(() => orders.processNew({ worker: 'next' }))
    expect(done).toHaveLength(1)
  })
})

describe('parseOrderInput', () => {
  it('accepts a valid order', () => {
    expect(parseOrderInput(input)).toEqual(input)
  })

  it.each([
    [undefined, /expected a JSON object/],
    [[], /expected a JSON object/],
    [{ customer: '', items: [] }, /customer/],
    [{ customer: 'a', items: [] }, /items: expected an array of 1 to 100/],
    [{ customer: 'a', items: [{ sku: '', quantity: 1, priceCents: 1 }] }, /items\[0\]\.sku/],
    [
      { customer: 'a', items: [{ sku: 'X', quantity: 1.5, priceCents: 1 }] },
      /items\[0\]\.quantity/,
    ],
    [
      { customer: 'a', items: [{ sku: 'X', quantity: 1, priceCents: -1 }] },
      /items\[0\]\.priceCents/,
    ],
  ])('rejects %j with a message naming the field', (body, message) => {
    expect(() => parseOrderInput(body)).toThrow(InvalidOrderError)
    expect(() => parseOrderInput(body)).toThrow(message)
  })
})

// Review probe (session 6): examples/README.md, "Schema creation runs in one unit of work under
// pg_advisory_xact_lock, so an app and a worker that start together do not race on
// CREATE TABLE IF NOT EXISTS".
describe('createSchema', () => {
  it('run by six scopes (six pools) at once on an empty database: all succeed, one schema', async () => {
    const fresh = await testDatabase('example_shared_schema_race')
    const scopes = Array.from({ length: 6 }, (_, n) => {
      const p = new pg.Pool({ connectionString: fresh, max: 1 })
      return createScope({
        driver: kyselyDriver(new PostgresDialect({ pool: p }), { pool: p }),
        name: `starter-${n}`,
        default: false,
      })
    })
    try {
      const results = await Promise.allSettled(
        scopes.map((s) => s.run(() => createSchema(scopedKysely<DB>(s)), { name: 'migrate' })),
      )
      expect(results.filter((r) => r.status === 'rejected')).toEqual([])
      const tables = await independentQuery<{ table_name: string }>(
        fresh,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
      )
      expect(tables.map((t) => t.table_name)).toEqual(['order_items', 'orders'])
    } finally {
      await Promise.all(scopes.map((s) => s.close()))
    }
  })
})
