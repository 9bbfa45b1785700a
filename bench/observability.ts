/**
 * What observability costs per scope.
 *
 *   pnpm exec tsx bench/observability.ts              # 21 rounds
 *   ROUNDS=41 OPS=10000 pnpm exec tsx bench/observability.ts
 *
 * One operation = `scope.run()` + one tracked `use()` on an in-memory driver
 * ('auto' mode: checkout, BEGIN, statement, COMMIT, release), so every
 * diagnostics channel on the happy path (acquire, commit, release, close)
 * is passed. No database: a real round trip would bury the difference in
 * network noise. Variants, run interleaved (the order rotates every round, so
 * load drift hits all alike); figures are the median of per-round µs/op, and
 * ratios the median of the per-round ratios to the baseline:
 *
 * - **compiled out** (baseline): a copy of `packages/core/src` in which every
 *   `channels.<name>.hasSubscribers` is the constant `false` (so V8 drops the
 *   publishing branches) and the session's creation timestamp is not taken:
 *   the core as if observability had never been written;
 * - **compiled out, again**: a second scope of that same build, to show the
 *   noise floor of the method;
 * - **no subscriber, no meter**: `@scoped/core` as shipped, nobody listening;
 * - **all channels subscribed**: a no-op subscriber on each of the 8 channels
 *   (an APM agent that listens to everything);
 * - **instrumentScope + SDK**: `@scoped/core/otel` recording into a real
 *   OpenTelemetry SDK MeterProvider (histograms and counter per event).
 *
 * Not a test; prints a markdown table.
 */
import dc from 'node:diagnostics_channel'
import { cp, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises'
import os from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import * as shipped from '@scoped/core'
import { instrumentScope } from '@scoped/core/otel'
import { testMeterProvider } from '../packages/core/test/otel-support.ts'

const ROUNDS = Number(process.env.ROUNDS ?? 21)
const OPS = Number(process.env.OPS ?? 5_000)

type Core = typeof shipped
type Scope = shipped.Scope<Conn>

interface Conn {
  id: number
  inTx: boolean
}

/** The smallest driver that runs a unit of work: one reusable connection per slot, no I/O. */
function memoryDriver(): shipped.Driver<Conn> {
  const idle: Conn[] = [{ id: 1, inTx: false }]
  let made = 1
  return {
    name: 'memory',
    acquire: async () => idle.pop() ?? { id: ++made, inTx: false },
    release: (c) => {
      idle.push(c)
    },
    begin: async (c) => {
      c.inTx = true
    },
    commit: async (c) => {
      c.inTx = false
    },
    rollback: async (c) => {
      c.inTx = false
    },
    poolStats: () => ({ total: made, idle: idle.length, waiting: 0, max: 10 }),
  }
}

const statement = async (c: Conn) => c.id

/**
 * Build the "compiled out" core: copy the sources and make every publish
 * guard a constant false. Fails loudly if the sources no longer have the
 * shape this relies on, instead of silently measuring nothing.
 */
async function compiledOutCore(): Promise<{ core: Core; cleanup: () => Promise<void> }> {
  const src = fileURLToPath(new URL('../packages/core/src', import.meta.url))
  const dir = await mkdtemp(join(os.tmpdir(), 'scoped-bench-obs-'))
  await cp(src, join(dir, 'src'), { recursive: true })
  let guards = 0
  let stamps = 0
  for (const name of await readdir(join(dir, 'src'))) {
    if (!name.endsWith('.ts')) continue
    const file = join(dir, 'src', name)
    const text = await readFile(file, 'utf8')
    const out = text
      .replace(/channels\.\w+\.hasSubscribers/g, () => {
        guards++
        return 'false'
      })
      .replace(/#createdAt = performance\.now\(\)/g, () => {
        stamps++
        return '#createdAt = 0'
      })
    await writeFile(file, out)
  }
  const channelCount = Object.keys(shipped.channels).length
  if (guards < channelCount || stamps !== 1) {
    throw new Error(
      `bench/observability: expected at least ${channelCount} publish guards and 1 creation stamp in packages/core/src, ` +
        `found ${guards} and ${stamps}; update the transform.`,
    )
  }
  const core = (await import(join(dir, 'src', 'index.ts'))) as Core
  return { core, cleanup: () => rm(dir, { recursive: true, force: true }) }
}

interface Variant {
  name: string
  scope: Scope
  /** Set up listeners for a batch, return their teardown (so no other variant runs with them). */
  around?: () => () => void
  /** Per round: wall-clock and process CPU µs per op. */
  wall: number[]
  cpu: number[]
}

/** Run one batch; record wall-clock and CPU time per op (CPU time is what other processes' load disturbs least). */
async function batch(v: Variant, record = true): Promise<void> {
  const { scope } = v
  const teardown = v.around?.()
  try {
    const cpu0 = process.cpuUsage()
    const start = process.hrtime.bigint()
    for (let i = 0; i < OPS; i++) {
      await scope.run(() => scope.getSession().use(statement), { name: 'GET /orders/:id' })
    }
    const wall = Number(process.hrtime.bigint() - start) / OPS / 1_000
    const cpu = process.cpuUsage(cpu0)
    if (record) {
      v.wall.push(wall)
      v.cpu.push((cpu.user + cpu.system) / OPS)
    }
  } finally {
    teardown?.()
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2
}

function makeScope(core: Core, name: string): Scope {
  // Production settings: no stack capture; leak detection at its default (a timer per checkout).
  return core.createScope({ driver: memoryDriver(), name, default: false, captureStacks: false })
}

async function main(): Promise<void> {
  const { core: bare, cleanup } = await compiledOutCore()
  const otel = testMeterProvider()
  const noop = () => {}
  const channelNames = Object.values(shipped.channels).map((c) => c.name as string)

  const variants: Variant[] = [
    { name: 'compiled out (baseline)', scope: makeScope(bare, 'bare'), wall: [], cpu: [] },
    {
      name: 'compiled out, again (noise floor)',
      scope: makeScope(bare, 'bare-2'),
      wall: [],
      cpu: [],
    },
    { name: 'no subscriber, no meter', scope: makeScope(shipped, 'shipped'), wall: [], cpu: [] },
    {
      name: 'all 8 channels subscribed (no-op)',
      scope: makeScope(shipped, 'subscribed'),
      around: () => {
        for (const n of channelNames) dc.subscribe(n, noop)
        return () => {
          for (const n of channelNames) dc.unsubscribe(n, noop)
        }
      },
      wall: [],
      cpu: [],
    },
  ]
  const metered = makeScope(shipped, 'metered')
  variants.push({
    name: 'instrumentScope + OTel SDK MeterProvider',
    scope: metered,
    around: () => instrumentScope(metered, { meterProvider: otel.provider }),
    wall: [],
    cpu: [],
  })

  try {
    // Sanity: the compiled-out build publishes nothing even with a subscriber; the shipped one does.
    let heard = 0
    const count = () => {
      heard++
    }
    dc.subscribe(shipped.channels.acquire.name as string, count)
    const probe = makeScope(bare, 'probe')
    await probe.run(() => probe.getSession().use(statement))
    const heardBare = heard
    const probe2 = makeScope(shipped, 'probe-2')
    await probe2.run(() => probe2.getSession().use(statement))
    dc.unsubscribe(shipped.channels.acquire.name as string, count)
    await Promise.all([probe.close(), probe2.close()])
    if (heardBare !== 0 || heard !== 1) {
      throw new Error(
        `compiled-out build published ${heardBare} acquire events, shipped ${heard - heardBare}`,
      )
    }
    for (const v of variants) await batch(v, false) // warm-up: JIT, the ring of connections
    for (let r = 0; r < ROUNDS; r++) {
      // Rotate the start and alternate the direction, so no variant always runs first or last.
      const order = variants.map((_, i) => variants[(i + r) % variants.length]!)
      if (r % 2 === 1) order.reverse()
      for (const v of order) await batch(v)
      process.stderr.write(`round ${r + 1}/${ROUNDS}\r`)
    }
    if (channelNames.some((n) => dc.hasSubscribers(n)))
      throw new Error('a subscriber leaked out of its variant')
    // Sanity: the metered scope recorded every one of its operations, warm-up included.
    const recorded = (await otel.collect()).histogram('db.client.connection.wait_time', {
      'db.client.connection.pool.name': 'metered',
    })?.count
    if (recorded !== (ROUNDS + 1) * OPS) {
      throw new Error(`instrumentScope recorded ${recorded} waits, expected ${(ROUNDS + 1) * OPS}`)
    }
  } finally {
    for (const v of variants) await v.scope.close()
    await otel.provider.shutdown()
    await cleanup()
  }

  const fmt = (us: number) => us.toFixed(2)
  const ratio = (xs: number[], base: number[]) => median(xs.map((x, i) => x / base[i]!))
  const spread = (xs: number[], base: number[]) => {
    const r = xs.map((x, i) => x / base[i]!).sort((a, b) => a - b)
    // The middle half of the per-round ratios: how far one round can be trusted.
    return `${r[Math.floor(r.length / 4)]!.toFixed(2)}–${r[Math.floor((3 * r.length) / 4)]!.toFixed(2)}`
  }
  const [base] = variants
  const lines = [
    `### Observability cost per scope (scope.run + one use, 'auto' mode, in-memory driver; ` +
      `median of ${ROUNDS} interleaved rounds × ${OPS} ops; Node ${process.version}, ` +
      `${os.cpus().length} × ${os.cpus()[0]?.model.trim()}, load average ${os.loadavg()[0]!.toFixed(1)})`,
    '',
    '| variant | CPU µs/op | ratio (CPU) | middle half of rounds (CPU) | wall µs/op | ratio (wall) |',
    '|---|---:|---:|---:|---:|---:|',
  ]
  for (const v of variants) {
    lines.push(
      `| ${v.name} | ${fmt(median(v.cpu))} | ${ratio(v.cpu, base!.cpu).toFixed(3)}× | ${spread(v.cpu, base!.cpu)} | ` +
        `${fmt(median(v.wall))} | ${ratio(v.wall, base!.wall).toFixed(3)}× |`,
    )
  }
  console.log(`\n${lines.join('\n')}`)
  console.log(
    "\nRatios are medians of per-round ratios to the compiled-out build. CPU time is the process's " +
      'user + system time, so other processes competing for the cores disturb it less than wall time.',
  )
}

await main()
