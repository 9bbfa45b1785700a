/**
 * Suite 1: what a scope costs in-process, one operation after another, on
 * Node 20 and Node 24 — without the database (against a plain async call and
 * a bare AsyncLocalStorage.run), and for one-read units against the same work
 * written by hand (sequential latency, where pipelining's saved round trip
 * shows).
 */
import { execFileSync } from 'node:child_process'
import type { Group } from '../apps/micro.ts'
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
