/**
 * Suite 5: how long each request holds a pooled connection (suites 3 and 4),
 * and that a request that never queries holds none (suite 2).
 */
import type { SuiteResult, Target } from '../lib/suite.ts'
import type { HoldsNothing } from './2-http-no-db.ts'
import { type DbRuns, holdTable } from './db-http.ts'

export function holdTime(
  read: DbRuns | undefined,
  write: DbRuns | undefined,
  holdsNothing: HoldsNothing[] | undefined,
): SuiteResult {
  const targets: Target[] = []
  const parts = [
    "Hold time is measured in each server from the pool's own events, the same way for every",
    "variant: pg-pool's `acquire` → `release` (tarn's `acquireSuccess` → `release` for MikroORM),",
    'so it covers exactly what hand-written code holds between `connect()` and `release()`. For',
    "our variants the `scoped:release` diagnostics channel's `heldMs` (checkout → release, as the",
    'session saw it) is shown beside it. Per run mean and p99, median over the interleaved rounds;',
    'peak is the most connections checked out at once in any run.',
    '',
  ]
  if (read) parts.push(`### One read (suite 3)\n\n${holdTable(read)}\n`)
  if (write) parts.push(`### One write unit (suite 4)\n\n${holdTable(write)}\n`)
  if (holdsNothing && holdsNothing.length > 0) {
    parts.push('### A request that never queries holds nothing (suite 2)\n')
    parts.push(
      'After its runs, each scoped server of suite 2 (a real scope over a real pg pool, route',
      '`GET /hello` never calling `getSession()`) was asked for its figures:',
      '',
      '| framework | Node | requests served | connections acquired | pool.totalCount |',
      '|---|---|---:|---:|---:|',
      ...holdsNothing.map(
        (h) =>
          `| ${h.framework}${h.variant === 'scoped' ? '' : ` (${h.variant})`} | ${h.node} | ${h.requests} | ${h.acquired} | ${h.poolTotal} |`,
      ),
      '',
    )
    const bad = holdsNothing.filter((h) => h.acquired !== 0 || h.poolTotal !== 0)
    targets.push({
      name: 'a request that never queries',
      goal: 'holds nothing (0 acquired, empty pool)',
      figure: bad.length
        ? bad.map((h) => `${h.framework} ${h.node}: ${h.acquired} acquired`).join(', ')
        : `0 acquired over ${holdsNothing.reduce((n, h) => n + h.requests, 0)} requests`,
      met: bad.length === 0,
    })
  }
  return {
    file: '5-hold-time.md',
    title: 'Connection hold time',
    markdown: parts.join('\n'),
    targets,
  }
}
