/**
 * In-process measurements, one operation after another (latency, not
 * throughput): what a scope costs without the database, and what a one-read
 * unit of work costs against the same work written by hand. Run as a bundle
 * under plain node (bench/lib/bundle.ts); prints JSON for the runner.
 *
 * Every group is a set of sides measured in interleaved rounds (A B C, C B A,
 * …); each round runs a batch of operations per side and records wall and
 * CPU time per operation.
 */
import { AsyncLocalStorage } from 'node:async_hooks'
import { createScope } from '@scoped/core'
import { pgDriver, scopedPool } from '@scoped/pg'
import pg from 'pg'
import { SELECT_ORDER } from './schema.ts'

export interface Side {
  name: string
  /** µs per operation, one entry per round. */
  wall: number[]
  cpu: number[]
}

export interface Group {
  title: string
  sides: Side[]
}

const quick = process.env.BENCH_QUICK === '1'
const url = process.env.BENCH_URL ?? ''
const ROUNDS = quick ? 5 : 15

async function batch(
  fn: () => Promise<unknown>,
  ops: number,
): Promise<{ wall: number; cpu: number }> {
  const cpu0 = process.cpuUsage()
  const start = process.hrtime.bigint()
  for (let i = 0; i < ops; i++) await fn()
  const wall = Number(process.hrtime.bigint() - start) / 1000 / ops
  const cpu = process.cpuUsage(cpu0)
  return { wall, cpu: (cpu.user + cpu.system) / ops }
}

/** `ops` operations by `workers` concurrent callers; wall time per op is 1 / throughput. */
async function concurrently(
  fn: () => Promise<unknown>,
  ops: number,
  workers: number,
): Promise<{ wall: number; cpu: number }> {
  let next = 0
  const worker = async () => {
    while (next < ops) {
      next++
      await fn()
    }
  }
  const cpu0 = process.cpuUsage()
  const start = process.hrtime.bigint()
  await Promise.all(Array.from({ length: workers }, worker))
  const wall = Number(process.hrtime.bigint() - start) / 1000 / ops
  const cpu = process.cpuUsage(cpu0)
  return { wall, cpu: (cpu.user + cpu.system) / ops }
}

async function group(
  title: string,
  ops: number,
  sides: [string, () => Promise<unknown>][],
  workers = 1,
): Promise<Group> {
  const run = (fn: () => Promise<unknown>, n: number) =>
    workers === 1 ? batch(fn, n) : concurrently(fn, n, workers)
  for (const [, fn] of sides) await run(fn, Math.ceil(ops / 2)) // JIT, connections, plans
  const out: Side[] = sides.map(([name]) => ({ name, wall: [], cpu: [] }))
  for (let r = 0; r < ROUNDS; r++) {
    const order = sides.map((_, i) => i)
    if (r % 2 === 1) order.reverse()
    for (const i of order) {
      const { wall, cpu } = await run(sides[i]![1], ops)
      out[i]!.wall.push(wall)
      out[i]!.cpu.push(cpu)
    }
  }
  return { title, sides: out }
}

async function main(): Promise<void> {
  const groups: Group[] = []

  // ── no database use ────────────────────────────────────────────────────
  {
    const pool = new pg.Pool({ connectionString: url, max: 1 })
    const scope = createScope({ driver: pgDriver(pool), name: 'micro', default: false })
    const als = new AsyncLocalStorage<object>()
    const work = async () => 1
    groups.push(
      await group('No database use', quick ? 5_000 : 20_000, [
        ['`await fn()`', () => work()],
        ['`als.run({}, fn)` (bare AsyncLocalStorage)', () => als.run({}, work)],
        ['`scope.run(fn)`', () => scope.run(work)],
        [
          '`scope.run(fn)`, fn calls `getSession()`',
          () =>
            scope.run(async () => {
              scope.getSession()
              return 1
            }),
        ],
        [
          '`scope.run(fn)`, fn calls `getSession()` 10 times',
          () =>
            scope.run(async () => {
              for (let i = 0; i < 10; i++) scope.getSession()
              return 1
            }),
        ],
      ]),
    )
    await scope.close()
  }

  // ── one statement, one unit of work ────────────────────────────────────
  {
    const max = 4
    const pool = new pg.Pool({ connectionString: url, max })
    const piped = new pg.Pool({ connectionString: url, max, pipeline: true } as pg.PoolConfig)
    const scope = createScope({ driver: pgDriver(pool), name: 'micro', default: false })
    const pipedScope = createScope({ driver: pgDriver(piped), name: 'piped', default: false })
    const db = scopedPool(scope)
    const pipedDb = scopedPool(pipedScope)
    const id = [42]
    const ops = quick ? 300 : 1_000

    groups.push(
      await group('One read, autocommit', ops, [
        [
          'hand-written `connect()` / query / `release()`',
          async () => {
            const c = await pool.connect()
            try {
              return await c.query(SELECT_ORDER, id)
            } finally {
              c.release()
            }
          },
        ],
        ['hand-written `pool.query()`', () => pool.query(SELECT_ORDER, id)],
        [
          "`scope.run()` + `scopedPool.query()`, `transaction: 'none'`",
          () => scope.run(() => db.query(SELECT_ORDER, id), { transaction: 'none' }),
        ],
      ]),
    )

    const handTx = async () => {
      const c = await pool.connect()
      try {
        await c.query('BEGIN')
        const r = await c.query(SELECT_ORDER, id)
        await c.query('COMMIT')
        c.release()
        return r
      } catch (e) {
        await c.query('ROLLBACK').catch(() => {})
        c.release(e as Error)
        throw e
      }
    }
    groups.push(
      await group('One-read unit of work (BEGIN / SELECT / COMMIT)', ops, [
        ['hand-written `connect()` / BEGIN / query / COMMIT / `release()`', handTx],
        [
          "`scope.run()` + `scopedPool.query()`, `'auto'`",
          () => scope.run(() => db.query(SELECT_ORDER, id)),
        ],
        [
          "`scope.run()` + `scopedPool.query()`, `'auto'`, pool `pipeline: true`",
          () => pipedScope.run(() => pipedDb.query(SELECT_ORDER, id)),
        ],
      ]),
    )

    // Many callers at once, as in a server (but without HTTP): pool of 10, 50 callers.
    const als = new AsyncLocalStorage<object>()
    const pool10 = new pg.Pool({ connectionString: url, max: 10 })
    const piped10 = new pg.Pool({ connectionString: url, max: 10, pipeline: true } as pg.PoolConfig)
    const scope10 = createScope({ driver: pgDriver(pool10), name: 'c10', default: false })
    const piped10Scope = createScope({ driver: pgDriver(piped10), name: 'p10', default: false })
    const db10 = scopedPool(scope10)
    const pipedDb10 = scopedPool(piped10Scope)
    const many = quick ? 1_000 : 4_000
    groups.push(
      await group(
        'One read, autocommit, 50 concurrent callers, pool of 10',
        many,
        [
          ['hand-written `pool.query()`', () => pool10.query(SELECT_ORDER, id)],
          [
            'hand-written `pool.query()` in a bare `als.run()`',
            () => als.run({}, () => pool10.query(SELECT_ORDER, id)),
          ],
          [
            'hand-written `connect()` / query / `release()` in a bare `als.run()`',
            () =>
              als.run({}, async () => {
                const c = await pool10.connect()
                try {
                  return await c.query(SELECT_ORDER, id)
                } finally {
                  c.release()
                }
              }),
          ],
          [
            "`scope.run()` + `scopedPool.query()`, `'none'`",
            () => scope10.run(() => db10.query(SELECT_ORDER, id), { transaction: 'none' }),
          ],
        ],
        50,
      ),
    )
    const handTx10 = async () => {
      const c = await pool10.connect()
      try {
        await c.query('BEGIN')
        const r = await c.query(SELECT_ORDER, id)
        await c.query('COMMIT')
        c.release()
        return r
      } catch (e) {
        await c.query('ROLLBACK').catch(() => {})
        c.release(e as Error)
        throw e
      }
    }
    groups.push(
      await group(
        'One-read unit of work, 50 concurrent callers, pool of 10',
        many,
        [
          ['hand-written BEGIN / query / COMMIT', handTx10],
          [
            'hand-written BEGIN / query / COMMIT in a bare `als.run()`',
            () => als.run({}, handTx10),
          ],
          [
            "`scope.run()` + `scopedPool.query()`, `'auto'`",
            () => scope10.run(() => db10.query(SELECT_ORDER, id)),
          ],
          [
            "`scope.run()` + `scopedPool.query()`, `'auto'`, pool `pipeline: true`",
            () => piped10Scope.run(() => pipedDb10.query(SELECT_ORDER, id)),
          ],
        ],
        50,
      ),
    )
    await Promise.all([scope.close(), pipedScope.close(), scope10.close(), piped10Scope.close()])
  }

  process.stdout.write(`${JSON.stringify({ node: process.version, groups })}\n`)
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
