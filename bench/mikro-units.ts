/**
 * CPU per unit of work, without HTTP: MikroORM's RequestContext against
 * @scoped/mikro-orm (`'none'` and `'auto'`), one read (`findOne` by primary
 * key) and one write (an order and its three items, `em.create()` +
 * `em.flush()`), each in one process over one MikroORM with a pool of 10.
 *
 *   flock /tmp/bench.lock pnpm exec tsx bench/mikro-units.ts
 *   ONLY=rc-read,none-read C=50 N=1500 ROUNDS=5 flock /tmp/bench.lock pnpm exec tsx bench/mikro-units.ts
 *
 * Each round runs N units of each kind with C concurrent workers, kinds
 * interleaved, and prints process CPU µs per unit and units per second (the
 * embedded PostgreSQL is another process: its CPU is not counted). The first
 * round is a warm-up. Not a test; run under `flock /tmp/bench.lock`.
 */
import { createScope } from '@scoped/core'
import { currentEntityManager, mikroOrmDriver } from '@scoped/mikro-orm'
import { startDatabase } from '../scripts/embedded-db.ts'
import { initMikro } from './apps/mikro.ts'
import { newOrder, seed, totalOf } from './apps/schema.ts'

const kinds = (
  process.env.ONLY ?? 'rc-read,none-read,auto-read,rc-write,none-write,auto-write'
).split(',')
const N = Number(process.env.N ?? 1500)
const C = Number(process.env.C ?? 50)
const ROUNDS = Number(process.env.ROUNDS ?? 5)

const db = await startDatabase()
try {
  const url = await db.createDatabase('scoped_bench_mikro_units')
  await seed(url)
  const { orm, Order, requestContext } = await initMikro(url, 10)
  // captureStacks off, as in the HTTP servers (they run with NODE_ENV=production, its default
  // there): with NODE_ENV unset here it defaulted on, a 50-frame stack per session (~30 µs/unit)
  // that RequestContext's units never pay.
  const none = createScope({
    driver: mikroOrmDriver(orm as any),
    name: 'none',
    transaction: 'none',
    default: false,
    captureStacks: false,
  })
  const auto = createScope({
    driver: mikroOrmDriver(orm as any),
    name: 'auto',
    default: false,
    captureStacks: false,
  })
  const create = (em: any) =>
    em.create(Order, {
      customer: newOrder.customer,
      total: String(totalOf(newOrder)),
      items: newOrder.items.map((i) => ({ sku: i.sku, qty: i.qty, price: String(i.price) })),
    })
  const units: Record<string, () => Promise<unknown>> = {
    'rc-read': () => requestContext(() => orm.em.findOne(Order, 42)),
    'rc-write': () =>
      requestContext(async () => {
        create(orm.em)
        await orm.em.flush()
      }),
    'none-read': () =>
      none.run(async () => (await currentEntityManager(none)).findOne(Order as any, 42)),
    'auto-read': () =>
      auto.run(async () => (await currentEntityManager(auto)).findOne(Order as any, 42)),
    'none-write': () =>
      none.run(async () => {
        const em = await currentEntityManager(none)
        create(em)
        await em.flush()
      }),
    'auto-write': () =>
      auto.run(async () => {
        const em = await currentEntityManager(auto)
        create(em)
        await em.flush()
      }),
  }
  const run = async (unit: () => Promise<unknown>) => {
    let left = N
    const worker = async () => {
      while (left-- > 0) await unit()
    }
    const c0 = process.cpuUsage()
    const t0 = performance.now()
    await Promise.all(Array.from({ length: C }, worker))
    const c = process.cpuUsage(c0)
    return { cpu: (c.user + c.system) / N, perSecond: N / ((performance.now() - t0) / 1000) }
  }
  for (let round = 0; round < ROUNDS; round++) {
    const line: string[] = []
    for (const kind of kinds) {
      const r = await run(units[kind]!)
      line.push(`${kind} ${r.cpu.toFixed(0)} µs ${r.perSecond.toFixed(0)}/s`)
    }
    console.log(`${round === 0 ? 'warm-up' : `round ${round}`}: ${line.join(' | ')}`)
  }
  await none.close()
} finally {
  await db.stop()
}
