/**
 * Suite 1: what a scope costs in-process, one operation after another, on
 * Node 20 and Node 24 — without the database (against a plain async call and
 * a bare AsyncLocalStorage.run), and for one-read units against the same work
 * written by hand (sequential latency, where pipelining's saved round trip
 * shows); and the bytes each operation allocates (bench/apps/alloc.ts).
 */
import { execFileSync } from 'node:child_process'
import { closeSync, openSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import type { AllocCase } from '../apps/alloc.ts'
import type { Group } from '../apps/micro.ts'
import { outDir } from '../lib/bundle.ts'
import { nodeVersion } from '../lib/machine.ts'
import { median, num, ratio, spread, table } from '../lib/stats.ts'
import type { Context, SuiteResult, Target } from '../lib/suite.ts'

function runMicro(ctx: Context, node: string): { node: string; groups: Group[] } {
  const out = execFileSync(node, [ctx.bundles.micro], {
    encoding: 'utf8',
    env: { ...process.env, NODE_ENV: 'production', BENCH_URL: ctx.url },
    stdio: ['ignore', 'pipe', 'inherit'],
    maxBuffer: 64 * 2 ** 20,
  })
  return JSON.parse(out.trim().split('\n').at(-1)!) as { node: string; groups: Group[] }
}

interface AllocRun {
  ops: number
  windows: number
  warmup: number
}

/**
 * Bytes allocated per operation in each window of one case's process: the
 * `allocated=` fields of V8's GC lines between the window's markers, over its
 * operations. The trace goes to a file, not a pipe: Node makes a stdout pipe
 * non-blocking, and V8's writes to it are then dropped when the pipe is full.
 */
function measureAlloc(ctx: Context, node: string, id: string, run: AllocRun): number[] {
  const path = join(outDir, `alloc-${id}.log`)
  const fd = openSync(path, 'w')
  try {
    execFileSync(node, ['--trace-gc-nvp', '--expose-gc', ctx.bundles.alloc, id], {
      env: {
        ...process.env,
        NODE_ENV: 'production',
        BENCH_ALLOC_OPS: String(run.ops),
        BENCH_ALLOC_WINDOWS: String(run.windows),
        BENCH_ALLOC_WARMUP: String(run.warmup),
      },
      stdio: ['ignore', fd, 'inherit'],
    })
  } finally {
    closeSync(fd)
  }
  const perOp: number[] = []
  let bytes: number | undefined
  let lastGc = ''
  for (const line of readFileSync(path, 'utf8').split('\n')) {
    if (line === '@@alloc start' || line === '@@alloc end') {
      // Each marker follows the full GC of a gc() call: else the trace is not in order.
      if (lastGc !== 'mc') throw new Error(`${path}: '${line}' not right after gc()`)
      if (line === '@@alloc start') bytes = 0
      else if (bytes !== undefined) perOp.push(bytes / run.ops)
      if (line === '@@alloc end') bytes = undefined
      lastGc = ''
      continue
    }
    const gc = / gc=(\w+) /.exec(line)?.[1]
    if (!gc) continue
    lastGc = gc
    const allocated = / allocated=(\d+) /.exec(line)?.[1]
    if (allocated === undefined) throw new Error(`${path}: a GC line without allocated=`)
    // V8 prints a size_t: a GC that found less than the last one counted wraps around 2^64.
    // BigInt, then back: the difference is small, Number() of the wrapped value is not exact.
    if (bytes !== undefined) bytes += Number(BigInt.asIntN(64, BigInt(allocated)))
  }
  if (perOp.length !== run.windows) {
    throw new Error(`${path}: ${perOp.length} windows measured, ${run.windows} expected`)
  }
  return perOp
}

/** One column per Node: bytes per operation, then bytes added to a bare AsyncLocalStorage.run. */
function allocTable(
  cases: AllocCase[],
  byNode: { version: string; perOp: Map<string, number[]> }[],
): string {
  const rows = cases.map((c) => {
    const bytes = byNode.map((n) => spread(n.perOp.get(c.id)!))
    const added = byNode.map((n) =>
      c.check || c.id === 'als'
        ? '—'
        : num(median(n.perOp.get(c.id)!) - median(n.perOp.get('als')!)),
    )
    return [c.check ? `${c.label} *(method check)*` : c.label, ...bytes, ...added]
  })
  return table(
    [
      'operation',
      ...byNode.map((n) => `B/op, Node ${n.version}`),
      ...byNode.map((n) => `added B vs bare ALS, Node ${n.version}`),
    ],
    rows,
  )
}

async function allocSection(ctx: Context, nodes: string[]): Promise<string> {
  const run: AllocRun = ctx.quick
    ? { ops: 20_000, windows: 5, warmup: 20_000 }
    : { ops: 100_000, windows: 5, warmup: 100_000 }
  const list = execFileSync(nodes[0]!, [ctx.bundles.alloc, '--list'], { encoding: 'utf8' })
  const cases = JSON.parse(list) as AllocCase[]
  const byNode: { version: string; perOp: Map<string, number[]> }[] = []
  for (const node of nodes) {
    const version = nodeVersion(node)
    ctx.log(`suite 1: bytes allocated per operation on Node ${version}`)
    const perOp = new Map<string, number[]>()
    for (const c of cases) perOp.set(c.id, measureAlloc(ctx, node, c.id, run))
    byNode.push({ version, perOp })
  }
  return [
    '### Bytes allocated per operation\n',
    `What: V8's bytes allocated (\`--trace-gc-nvp\` \`allocated=\`) over ${run.ops} operations between two \`gc()\` calls, after ${run.warmup} to warm up, one process per case, a driver that does nothing; median over ${run.windows} windows [min–max]. Unlike time, it does not move with the machine's load.  `,
    "Why: on Node 20 every promise made under an AsyncLocalStorage carries its hook's fields, and what a request allocates comes back as GC time.",
    '',
    allocTable(cases, byNode),
    '',
  ].join('\n')
}

function groupTable(g: Group): string {
  const base = g.sides[0]!
  // Without the database, the bare AsyncLocalStorage is the floor the scope is measured against.
  const floor = g.title === 'No database use' ? g.sides[1]! : base
  const rows = g.sides.map((s) => [
    s.name,
    spread(s.wall),
    spread(s.cpu),
    s === floor ? '—' : num(median(s.wall) - median(floor.wall)),
    s === floor ? '—' : ratio(s.wall, floor.wall).text,
    s === floor ? '—' : ratio(s.cpu, floor.cpu).text,
  ])
  return table(
    [
      'operation',
      'µs/op wall, median [min–max]',
      'µs/op CPU',
      `added µs vs ${floor === base ? 'first row' : 'bare ALS'}`,
      'ratio wall [per round]',
      'ratio CPU',
    ],
    rows,
  )
}

export async function scopeOverhead(ctx: Context): Promise<SuiteResult> {
  const nodes = [ctx.node20, ...(ctx.node24 ? [ctx.node24] : [])]
  const sections: string[] = []
  const targets: Target[] = []
  for (const node of nodes) {
    const version = nodeVersion(node)
    ctx.log(`suite 1: in-process micro benchmarks on Node ${version}`)
    const { groups } = runMicro(ctx, node)
    sections.push(`### Node ${version}\n`)
    for (const g of groups) sections.push(`**${g.title}**\n\n${groupTable(g)}\n`)
    const unit = groups.find((g) => g.title === 'One-read unit of work (BEGIN / SELECT / COMMIT)')
    const hand = unit?.sides[0]
    const piped = unit?.sides.find((s) => s.name.includes('pipeline'))
    if (hand && piped) {
      const r = ratio(piped.wall, hand.wall)
      targets.push({
        name: `'auto' latency, units one after another, pipelined (Node ${version})`,
        goal: '≤ 0.8 × hand-written connect/BEGIN/query/COMMIT/release',
        figure: `${r.text} (${num(median(piped.wall))} vs ${num(median(hand.wall))} µs)`,
        met: r.value <= 0.8,
      })
    }
  }
  sections.push(await allocSection(ctx, nodes))
  const rounds = ctx.quick ? 5 : 15
  const markdown = [
    `Each group is measured in one process, one operation after another, in ${rounds} interleaved`,
    'rounds (A B C, C B A, …); each round runs a batch per row. Figures are the median of the',
    "rounds' µs per operation, [min–max] over rounds; ratios are to the first row (to the bare",
    '`AsyncLocalStorage.run` for "No database use"), medians over medians, with the range of the',
    'per-round ratios. CPU is this process only (PostgreSQL runs elsewhere). The "50 concurrent',
    'callers" groups run each batch with 50 callers at once on a pool of 10, as a server would',
    '(without HTTP): there µs/op wall is 1 / throughput. Scopes use the',
    'production defaults (`NODE_ENV=production`: no stack capture; leak detection on).',
    '',
    ...sections,
  ].join('\n')
  return { file: '1-scope-overhead.md', title: 'Scope overhead (in-process)', markdown, targets }
}
