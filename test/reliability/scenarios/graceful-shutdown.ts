/**
 * Graceful shutdown under load: an app in a child process (HTTP + a worker
 * loop, support/shutdown-app.ts) gets SIGTERM while 50 slow requests and a
 * worker iteration are in flight. The in-flight units finish and commit, new
 * connections are refused, the scope refuses new work, the pool ends, the
 * process exits by itself with code 0, and no unit is half-committed.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { expect } from 'vitest'
import { independentQuery, testDatabase } from '../../support/db.ts'
import { type Adapter, unitsTable } from '../support/apps.ts'
import { idleInTransaction } from '../support/checks.ts'
import { NET_ERROR, runLoad } from '../support/load.ts'
import { record } from '../support/report.ts'

const appFile = fileURLToPath(new URL('../support/shutdown-app.ts', import.meta.url))
const root = fileURLToPath(new URL('../../../', import.meta.url))

interface Shutdown {
  ms: number
  atSigterm: { inflight: number; jobsRunning: number }
  jobs: { started: number; finished: number }
  refused: string
  poolEnded: boolean
  pool: { total: number; idle: number; waiting: number }
  stats: { open: number; holding: number; totals: { forced: number } }
}

/** The child's stdout as a stream of JSON events; `next(key)` waits for the first with that key. */
function events(child: ChildProcess) {
  const seen: Record<string, unknown>[] = []
  const waiting: { key: string; resolve: (v: unknown) => void }[] = []
  createInterface({ input: child.stdout! }).on('line', (line) => {
    let o: Record<string, unknown>
    try {
      o = JSON.parse(line)
    } catch {
      return
    }
    seen.push(o)
    for (const w of [...waiting]) {
      if (w.key in o) {
        waiting.splice(waiting.indexOf(w), 1)
        w.resolve(o[w.key])
      }
    }
  })
  return {
    next<T>(key: string, ms = 30_000): Promise<T> {
      const hit = seen.find((o) => key in o)
      if (hit) return Promise.resolve(hit[key] as T)
      return new Promise<T>((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`the app never said ${key}`)), ms)
        waiting.push({
          key,
          resolve: (v) => {
            clearTimeout(t)
            resolve(v as T)
          },
        })
      })
    },
  }
}

export async function gracefulShutdown(
  adapter: Adapter,
  o: { requests: number; slowMs: number },
): Promise<void> {
  const started = performance.now()
  const url = await testDatabase(`rel_shutdown_${adapter}`)
  await independentQuery(url, unitsTable)
  let stderr = ''
  const child = spawn(process.execPath, ['--import', 'tsx', appFile], {
    cwd: root,
    env: {
      ...process.env,
      DATABASE_URL: url,
      ADAPTER: adapter,
      REPORT_INFLIGHT: String(o.requests),
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  child.stderr!.on('data', (d) => {
    stderr += d
  })
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))
  const ev = events(child)
  try {
    const port = await ev.next<number>('ready')
    const load = runLoad(undefined, {
      port,
      total: o.requests,
      concurrency: o.requests,
      mix: [['slow', 1]],
      slowMs: o.slowMs,
      seed: 9,
      prefix: 'inflight',
    })
    await ev.next('inflight')
    child.kill('SIGTERM')
    await ev.next('closing')
    // New connections after SIGTERM are refused.
    const late = await runLoad(undefined, {
      port,
      total: 5,
      concurrency: 5,
      mix: [['ok', 1]],
      seed: 10,
      prefix: 'late',
    })
    const r = await load
    const summary = await ev.next<Shutdown>('shutdown')
    const code = await Promise.race([
      exited,
      new Promise<'hung'>((resolve) => setTimeout(() => resolve('hung'), 20_000)),
    ])

    const problems: string[] = []
    if (code !== 0)
      problems.push(
        `exit code ${code}${code === 'hung' ? ' (still running 20 s after shutdown)' : ''}: ${stderr.slice(-500)}`,
      )
    const answered = [...r.client].filter((c) => c === 200).length
    if (answered !== o.requests)
      problems.push(`${o.requests - answered} in-flight requests were not answered 200`)
    const refused = [...late.client].filter((c) => c === NET_ERROR).length
    if (refused !== 5)
      problems.push(`${5 - refused} requests after SIGTERM were not refused: ${[...late.client]}`)
    // The fault really hit work in flight: all requests, and a worker iteration.
    if (summary.atSigterm.inflight !== o.requests || summary.atSigterm.jobsRunning !== 1) {
      problems.push(
        `at SIGTERM: ${JSON.stringify(summary.atSigterm)}, expected ${o.requests} requests and 1 job in flight`,
      )
    }
    if (summary.refused !== 'SCOPE_CLOSED') problems.push(`runJob after close: ${summary.refused}`)
    if (!summary.poolEnded) problems.push('the pool did not end')
    if (summary.stats.totals.forced !== 0)
      problems.push(`${summary.stats.totals.forced} connections taken by force`)
    if (summary.jobs.started !== summary.jobs.finished) {
      problems.push(
        `worker: ${summary.jobs.started} iterations started, ${summary.jobs.finished} finished`,
      )
    }
    const rows = await independentQuery<{ id: string; parts: string[] }>(
      url,
      'SELECT id, array_agg(part ORDER BY part) AS parts FROM units GROUP BY id',
    )
    const half = rows.filter((x) => x.parts.length !== 2).map((x) => `${x.id}: ${x.parts}`)
    const inflightUnits = rows.filter(
      (x) => x.id.startsWith('inflight') && x.parts.length === 2,
    ).length
    const jobUnits = rows.filter((x) => x.id.startsWith('job') && x.parts.length === 2).length
    if (half.length > 0) problems.push(`half-committed: ${half.slice(0, 5).join('; ')}`)
    if (inflightUnits !== answered)
      problems.push(`${inflightUnits} request units committed, ${answered} answered`)
    if (jobUnits !== summary.jobs.finished)
      problems.push(`${jobUnits} job units committed, ${summary.jobs.finished} finished`)
    if (rows.some((x) => x.id.startsWith('late')))
      problems.push('a request after SIGTERM committed')
    const left = await independentQuery<{ n: number }>(
      url,
      'SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()',
    )
    const idle = await idleInTransaction(url)
    const leaked = left[0]!.n + idle + summary.stats.open + summary.stats.holding
    if (left[0]!.n > 0) problems.push(`${left[0]!.n} backends of the app still connected`)

    record({
      scenario: 'graceful shutdown',
      adapter,
      load: `${summary.atSigterm.inflight} requests (${o.slowMs} ms each, pool 10) and ${summary.atSigterm.jobsRunning} worker-loop iteration in flight at SIGTERM (${summary.jobs.finished} iterations in all), app in a child process`,
      faults: `SIGTERM mid-load; 5 new connections after it; shutdown took ${summary.ms} ms, exit code ${code}`,
      failed: o.requests - answered,
      why: `${refused} new connections refused (as they must be); runJob after close: ${summary.refused}`,
      leaked,
      lost:
        half.length +
        Math.abs(inflightUnits - answered) +
        Math.abs(jobUnits - summary.jobs.finished),
      durationMs: performance.now() - started,
      problems,
    })
    expect(problems).toEqual([])
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL')
  }
}
