/**
 * The worker, started as `pnpm start` starts it, on its own database: it
 * processes new orders, and SIGTERM in the middle of a job lets that job
 * finish and commit, starts no other, closes the pool and exits 0.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { backends, independentQuery, testDatabase } from '../../../test/support/db.ts'
import { type ExampleProcess, startExample } from '../../shared/test/child.ts'

let url: string
let worker: ExampleProcess | undefined

async function insertOrders(n: number): Promise<number[]> {
  const rows = await independentQuery<{ id: number }>(
    url,
    `WITH o AS (
       INSERT INTO orders (customer, total_cents)
       SELECT 'customer-' || i, 0 FROM generate_series(1, $1::int) AS i RETURNING id
     ), items AS (
       INSERT INTO order_items (order_id, sku, quantity, price_cents) SELECT id, 'SKU-' || id, 2, 500 FROM o
     ) SELECT id FROM o ORDER BY id`,
    [n],
  )
  return rows.map((r) => r.id)
}

async function statuses() {
  return independentQuery<{
    id: number
    status: string
    total_cents: number
    processed_by: string | null
  }>(url, 'SELECT id, status, total_cents, processed_by FROM orders ORDER BY id')
}

beforeAll(async () => {
  url = await testDatabase('example_worker')
})

afterAll(async () => {
  await worker?.stop('SIGKILL')
})

describe('worker: pnpm start', () => {
  it('processes new orders in batches; each batch is committed before it says so', async () => {
    worker = startExample('worker', { DATABASE_URL: url, BATCH: '2', INTERVAL_MS: '20' })
    const [, name] = await worker.waitFor(/(worker-\d+) started/)
    const ids = await insertOrders(5)
    const deadline = Date.now() + 30_000
    while (Date.now() < deadline && (await statuses()).some((o) => o.status !== 'processed')) {
      await new Promise((r) => setTimeout(r, 100))
    }
    const rows = await statuses()
    expect(rows.map((o) => o.id)).toEqual(ids)
    for (const o of rows)
      expect(o).toMatchObject({ status: 'processed', processed_by: name, total_cents: 1000 })
    // Every id reported "processed" after COMMIT, each once.
    await worker.waitFor(new RegExp(`processed orders .*\\b${ids.at(-1)}\\b`))
    const reported = [...worker.output().matchAll(/^processed orders (.+)$/gm)].flatMap((m) =>
      (m[1] ?? '').split(', ').map(Number),
    )
    expect(reported.sort((a, b) => a - b)).toEqual(ids)
    const { code } = await worker.stop('SIGTERM')
    expect(code).toBe(0)
  }, 120_000)

  it('SIGTERM mid-job: the current job finishes and commits, no new one starts, the pool closes, exit 0', async () => {
    await independentQuery(url, 'TRUNCATE orders, order_items RESTART IDENTITY')
    worker = startExample('worker', {
      DATABASE_URL: url,
      BATCH: '1',
      WORK_MS: '3000',
      INTERVAL_MS: '0',
    })
    const [, name] = await worker.waitFor(/(worker-\d+) started/)
    const ids = await insertOrders(3)
    const [, claimed] = await worker.waitFor(/claimed orders (\d+)/)
    expect(Number(claimed)).toBe(ids[0])

    // The job is in its 3 s of work, holding its row lock, in its transaction.
    expect((await backends(url, 'orders-worker')).map((b) => b.state)).toContain(
      'idle in transaction',
    )
    const { code, signal } = await worker.stop('SIGTERM')
    expect({ code, signal }).toEqual({ code: 0, signal: null })

    const out = worker.output()
    expect(out).toContain('SIGTERM: stopping after the current iteration')
    expect(out).toMatch(new RegExp(`processed orders ${ids[0]}\\n`))
    expect(out).toContain(`${name} stopped`)
    const rows = await statuses()
    expect(rows[0]).toMatchObject({ id: ids[0], status: 'processed', processed_by: name })
    expect(rows.slice(1).map((o) => o.status)).toEqual(['new', 'new'])
    // Nothing left connected: the scope closed the pool before the process exited.
    expect(await backends(url, 'orders-worker')).toEqual([])
  }, 120_000)
})
