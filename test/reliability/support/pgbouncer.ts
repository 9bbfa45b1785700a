/**
 * A PgBouncer (the Debian package `pgbouncer`) in front of the test server,
 * in `pool_mode = transaction`, on a free loopback port, configured in a
 * temporary directory. Run as the `postgres` OS user when we are root
 * (PgBouncer refuses to run as root).
 *
 * Missing PgBouncer is an error, never a skip: `.ci/run` installs it with
 * apt-get, and a machine without it cannot claim the PgBouncer results.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { chmod, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pg from 'pg'
import { freePort } from '../../../scripts/embedded-db.ts'

export interface PgBouncer {
  port: number
  /** `PgBouncer 1.18.0` */
  version: string
  /** A connection string through PgBouncer to `database` (an entry of `databases`, or any database). */
  url(database: string): string
  log(): Promise<string>
  stop(): Promise<void>
}

function binary(): string {
  for (const p of ['/usr/sbin/pgbouncer', '/usr/bin/pgbouncer', '/usr/local/bin/pgbouncer']) {
    if (existsSync(p)) return p
  }
  try {
    return execFileSync('sh', ['-c', 'command -v pgbouncer'], { encoding: 'utf8' }).trim()
  } catch {
    throw new Error(
      'PgBouncer is not installed, so the PgBouncer reliability tests cannot run. ' +
        'Install it: apt-get update && apt-get install -y pgbouncer (.ci/run does this before the tests).',
    )
  }
}

/**
 * @param serverUrl the PostgreSQL server PgBouncer forwards to
 * @param databases extra entries: name → `dbname=… pool_size=…`; any other database name is
 *   forwarded as is, with `default_pool_size`
 */
export async function startPgBouncer(
  serverUrl: string,
  opts: { databases?: Record<string, string>; defaultPoolSize?: number } = {},
): Promise<PgBouncer> {
  const bin = binary()
  const version = execFileSync(bin, ['--version'], { encoding: 'utf8' }).split('\n')[0]!.trim()
  const server = new URL(serverUrl)
  const user = decodeURIComponent(server.username || 'postgres')
  const password = decodeURIComponent(server.password)
  const target = `host=${server.hostname} port=${server.port || 5432} user=${user}${password ? ` password=${password}` : ''}`
  const dir = await mkdtemp(join(tmpdir(), 'scoped-pgbouncer-'))
  // PgBouncer drops to the postgres user and writes its log and pid file here.
  await chmod(dir, 0o777)
  const port = await freePort()
  const ini = join(dir, 'pgbouncer.ini')
  const entries = Object.entries(opts.databases ?? {}).map(
    ([name, params]) => `${name} = ${target} ${params}`,
  )
  await writeFile(join(dir, 'userlist.txt'), `"${user}" "${password}"\n`, { mode: 0o644 })
  await writeFile(
    ini,
    [
      '[databases]',
      ...entries,
      `* = ${target}`,
      '[pgbouncer]',
      'listen_addr = 127.0.0.1',
      `listen_port = ${port}`,
      'unix_socket_dir =',
      'auth_type = trust',
      `auth_file = ${join(dir, 'userlist.txt')}`,
      'pool_mode = transaction',
      `default_pool_size = ${opts.defaultPoolSize ?? 10}`,
      'max_client_conn = 500',
      // node-postgres sends it at startup; PgBouncer must not refuse clients over it.
      'ignore_startup_parameters = extra_float_digits',
      `logfile = ${join(dir, 'pgbouncer.log')}`,
      `pidfile = ${join(dir, 'pgbouncer.pid')}`,
      `admin_users = ${user}`,
      '',
    ].join('\n'),
    { mode: 0o644 },
  )
  const asRoot = process.getuid?.() === 0
  const child: ChildProcess = spawn(bin, [...(asRoot ? ['-u', 'postgres'] : []), ini], {
    stdio: ['ignore', 'ignore', 'pipe'],
  })
  let stderr = ''
  child.stderr!.on('data', (d) => {
    stderr += d
  })
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()))
  const log = () => readFile(join(dir, 'pgbouncer.log'), 'utf8').catch(() => '')
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM') // immediate shutdown
      await exited
    }
    await rm(dir, { recursive: true, force: true })
  }
  const url = (database: string) =>
    `postgres://${encodeURIComponent(user)}:${encodeURIComponent(password)}@127.0.0.1:${port}/${database}`
  // Ready when a query goes through it to the server.
  const deadline = Date.now() + 15_000
  for (;;) {
    if (child.exitCode !== null) {
      const why = `${stderr}${await log()}`
      await stop()
      throw new Error(`PgBouncer exited with code ${child.exitCode} at startup:\n${why}`)
    }
    const c = new pg.Client({ connectionString: url(server.pathname.slice(1) || 'postgres') })
    c.on('error', () => {})
    try {
      await c.connect()
      await c.query('SELECT 1')
      await c.end()
      break
    } catch (e) {
      await c.end().catch(() => {})
      if (Date.now() > deadline) {
        const why = `${stderr}${await log()}`
        await stop()
        throw new Error(`PgBouncer did not accept connections within 15 s: ${String(e)}\n${why}`)
      }
      await new Promise((r) => setTimeout(r, 100))
    }
  }
  return { port, version, url, log, stop }
}
