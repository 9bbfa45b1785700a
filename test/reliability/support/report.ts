/**
 * The results table, produced by the run itself. Each scenario records one
 * row per adapter (as JSON, one file each, since vitest runs files in
 * separate processes); the table is rebuilt from all rows present:
 *
 * - long run (`pnpm test:reliability`): `test/reliability/RESULTS.md`,
 *   written once at the end by the config's global teardown;
 * - short run (`pnpm test`): `.tmp/reliability/RESULTS.short.md`, rebuilt
 *   after every row, and each row is printed.
 */
import { mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs'
import { availableParallelism } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('../../../', import.meta.url))

export type Mode = 'long' | 'short'

export function mode(): Mode {
  return process.env.RELIABILITY_MODE === 'long' ? 'long' : 'short'
}

/** Pick the size for this run. */
export function size<T>(short: T, long: T): T {
  return mode() === 'long' ? long : short
}

export interface Row {
  scenario: string
  adapter: string
  /** What load was held: requests, concurrency, pool. */
  load: string
  /** What faults were injected. */
  faults: string
  /** Requests that failed, and why (grouped reasons). */
  failed: number
  why: string
  /** Connections leaked (checked out, held, waiting, idle in transaction): must be 0. */
  leaked: number
  /** Units lost (answered but not committed, or committed but not answered) or half-applied: must be 0. */
  lost: number
  /** Memory trend, where measured. */
  memory?: string
  durationMs: number
  /** What the scenario's assertions found wrong (empty when it passed). */
  problems: string[]
}

function rowsDir(m: Mode): string {
  return join(root, '.tmp', 'reliability', m, 'rows')
}

export function clearRows(m: Mode): void {
  rmSync(rowsDir(m), { recursive: true, force: true })
}

export function record(row: Row): void {
  const m = mode()
  const dir = rowsDir(m)
  mkdirSync(dir, { recursive: true })
  const file = `${row.scenario}--${row.adapter}`.replace(/[^a-z0-9-]+/gi, '_')
  writeFileSync(join(dir, `${file}.json`), JSON.stringify(row))
  if (m === 'short') {
    console.log(`[reliability] ${tableOf([row], false)}`)
    writeAtomic(join(root, '.tmp', 'reliability', 'RESULTS.short.md'), document(readRows(m), m))
  }
}

export function readRows(m: Mode): Row[] {
  let files: string[] = []
  try {
    files = readdirSync(rowsDir(m)).filter((f) => f.endsWith('.json'))
  } catch {
    return []
  }
  const order = [
    'soak',
    'backend kills',
    'server restart',
    'hung handler',
    'pool exhaustion',
    'graceful shutdown',
    'pgbouncer',
    'bad input',
  ]
  return files
    .map((f) => JSON.parse(readFileSync(join(rowsDir(m), f), 'utf8')) as Row)
    .sort(
      (a, b) =>
        order.indexOf(a.scenario) - order.indexOf(b.scenario) ||
        a.scenario.localeCompare(b.scenario) ||
        a.adapter.localeCompare(b.adapter),
    )
}

export function writeResults(m: Mode): string {
  const file =
    m === 'long'
      ? join(root, 'test', 'reliability', 'RESULTS.md')
      : join(root, '.tmp', 'reliability', 'RESULTS.short.md')
  writeAtomic(file, document(readRows(m), m))
  return file
}

function writeAtomic(file: string, text: string): void {
  mkdirSync(join(file, '..'), { recursive: true })
  const tmp = `${file}.${process.pid}.tmp`
  writeFileSync(tmp, text)
  renameSync(tmp, file)
}

const cell = (s: string) => s.replace(/\|/g, '\\|').replace(/\n/g, ' ')

function seconds(ms: number): string {
  return ms >= 10_000 ? `${Math.round(ms / 1000)} s` : `${(ms / 1000).toFixed(1)} s`
}

function tableOf(rows: Row[], header = true): string {
  const lines = rows.map(
    (r) =>
      `| ${cell(r.scenario)} | ${cell(r.adapter)} | ${cell(r.load)} | ${cell(r.faults)} | ${r.failed}${r.why ? `: ${cell(r.why)}` : ''} | ${r.leaked} | ${r.lost} | ${cell(r.memory ?? '')} | ${seconds(r.durationMs)} | ${r.problems.length === 0 ? 'pass' : `**FAIL**: ${cell(r.problems.slice(0, 3).join('; '))}`} |`,
  )
  if (!header) return lines.join('\n')
  return [
    '| scenario | adapter | load held | faults injected | requests failed: why | connections leaked | units lost or half-applied | memory (slope after warm-up) | duration | result |',
    '|---|---|---|---|---|---:|---:|---|---:|---|',
    ...lines,
  ].join('\n')
}

function document(rows: Row[], m: Mode): string {
  const when = new Date().toISOString().replace(/\.\d+Z$/, 'Z')
  return [
    `# Reliability results (${m} run)`,
    '',
    `Produced by \`${m === 'long' ? 'pnpm test:reliability' : 'pnpm test'}\` on ${when}, Node ${process.version}, ` +
      `${availableParallelism()} cores. ` +
      'Every number below is measured by the run that wrote this file; see `test/reliability/README.md` for what each scenario does and checks.',
    '',
    '"connections leaked" adds up connections still checked out, sessions still holding one, scopes still open, ' +
      'waiters, and backends `idle in transaction` after the scenario settled. "units lost or half-applied" adds up ' +
      'requests answered 2xx/4xx whose unit is not committed, committed units whose request was not answered 2xx/4xx, ' +
      "units with only one of their two rows, and units where the database and the app's afterCommit disagree. " +
      'Both must be 0. A request whose client left while its COMMIT was on the wire is counted as answered ' +
      '("lost in flight after COMMIT"): the unit is saved and the response was on its way.',
    '',
    tableOf(rows),
    '',
  ].join('\n')
}
