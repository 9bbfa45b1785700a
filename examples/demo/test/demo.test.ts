/**
 * `pnpm demo` itself, with fewer requests: it must exit 0 (all its own checks
 * passed), stop its embedded PostgreSQL, and print figures that add up.
 */
import { spawn } from 'node:child_process'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, describe, expect, it } from 'vitest'

const root = fileURLToPath(new URL('../../../', import.meta.url))
let dir: string | undefined

afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true })
})

interface Report {
  requests: number
  poolSize: number
  scoped: {
    outcomes: Record<string, number>
    created: number
    failedHalfway: number
    committed: number
    rolledBack: number
    peakInUse: number
    leftCheckedOut: number
    activity: Record<string, number>
    rows: { orders: number; halfway: number; processed: number }
    worker: {
      exitCode: number
      reported: number
      processed: number
      activity: Record<string, number>
    }
  }
  naive: {
    outcomes: Record<string, number>
    leftCheckedOut: number
    activity: Record<string, number>
  }
  naiveScoped: {
    poolTimeouts: number
    holding: number
    holders: string[]
    firstTimeout?: string
    forced: number
    activity: Record<string, number>
    activityAfterClose: Record<string, number>
  }
  checks: Record<string, boolean>
}

describe('pnpm demo', () => {
  it('runs the whole story on an embedded PostgreSQL, exits 0, and its figures add up', async () => {
    dir = await mkdtemp(join(tmpdir(), 'scoped-demo-test-'))
    const reportPath = join(dir, 'report.json')
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      DEMO_REQUESTS: '300',
      DEMO_NAIVE_SECONDS: '3',
      DEMO_REPORT_JSON: reportPath,
    }
    delete env.DATABASE_URL // as on a fresh machine: the demo starts its own server
    // What the root `demo` script runs: tsx examples/demo/demo.ts, from the workspace root.
    const tsx = createRequire(join(root, 'package.json')).resolve('tsx/cli')
    const child = spawn(process.execPath, [tsx, 'examples/demo/demo.ts'], {
      cwd: root,
      env,
      stdio: 'pipe',
    })
    let output = ''
    child.stdout.on('data', (c: Buffer) => {
      output += c.toString()
    })
    child.stderr.on('data', (c: Buffer) => {
      output += c.toString()
    })
    const code = await new Promise<number | null>((resolve) => child.once('exit', resolve))
    expect(code, output).toBe(0)

    // The report is printed…
    for (const heading of [
      '[1/4] PostgreSQL',
      '[2/4]',
      '[3/4]',
      '[4/4]',
      'Side by side',
      'Checks',
    ]) {
      expect(output).toContain(heading)
    }
    expect(output).toContain('All checks passed')
    expect(output).toContain('the embedded PostgreSQL is stopped')
    expect(output).not.toContain('✗')

    // …and its figures, from the JSON the same run wrote, are consistent.
    const r = JSON.parse(await readFile(reportPath, 'utf8')) as Report
    const s = r.scoped
    const n = (o: Record<string, number>, k: string) => o[k] ?? 0
    expect(Object.values(s.outcomes).reduce((a, b) => a + b, 0)).toBe(300)
    expect(n(s.outcomes, 'gave-up') + n(s.outcomes, 'network-error')).toBe(0)
    expect(s.created).toBe(n(s.outcomes, '201'))
    expect(s.rows.orders).toBe(s.created)
    expect(s.rows.halfway).toBe(0)
    expect(s.failedHalfway).toBeGreaterThan(0)
    expect(s.committed).toBe(n(s.outcomes, '201') + n(s.outcomes, '200') + n(s.outcomes, '404') + 1)
    expect(s.rolledBack).toBeGreaterThanOrEqual(n(s.outcomes, '500'))
    expect(s.rolledBack).toBeLessThanOrEqual(n(s.outcomes, '500') + n(s.outcomes, 'aborted'))
    expect(s.peakInUse).toBeGreaterThan(0)
    expect(s.peakInUse).toBeLessThanOrEqual(r.poolSize)
    expect(s.leftCheckedOut).toBe(0)
    expect(s.activity['idle in transaction']).toBeUndefined()
    expect(s.worker.exitCode).toBe(0)
    expect(s.worker.processed).toBe(s.worker.reported)
    expect(s.worker.activity).toEqual({})
    expect(output).toContain(`${s.created} orders for ${s.created} answers 201`)

    // The naive version leaked its whole pool, in open transactions.
    expect(r.naive.leftCheckedOut).toBe(r.poolSize)
    expect(r.naive.activity['idle in transaction']).toBeGreaterThan(0)
    expect(n(r.naive.outcomes, 'gave-up')).toBeGreaterThan(0)

    // Through a scope, the same leak fails fast and names its holders; close() reclaims them.
    const c = r.naiveScoped
    expect(c.poolTimeouts).toBeGreaterThan(0)
    expect(c.holding).toBe(r.poolSize)
    expect(c.holders).toHaveLength(r.poolSize)
    expect(c.holders.every((h) => /^(POST|GET) \/orders/.test(h))).toBe(true)
    expect(c.firstTimeout).toMatch(/waited 1000 ms for a connection and gave up/)
    expect(c.firstTimeout).toMatch(/Connections held now:\n {2}- 'POST \/orders/)
    // Review probe (session 6): examples/README.md, "a PoolTimeoutError that names every holder
    // (route, time held, acquisition site)": every listed holder has all three.
    const listed = (c.firstTimeout ?? '').split('\n').filter((l) => l.startsWith('  - '))
    expect(listed).toHaveLength(r.poolSize)
    for (const line of listed) {
      expect(line).toMatch(
        /^ {2}- '(POST|GET) \/orders[^']*' \(\S+\) held \d+ ms, [a-z-]+, acquired at \S/,
      )
    }
    expect(c.forced).toBe(c.holding)
    expect(c.activityAfterClose).toEqual({})
    expect(Object.values(r.checks).every(Boolean)).toBe(true)
  }, 240_000)
})
