/**
 * An application as it runs in production, for the graceful-shutdown
 * scenario: an HTTP app (the adapter named by `ADAPTER`) and a worker loop in
 * one process, over one scope, with the SIGTERM handler a user would write:
 *
 *   1. stop the worker loop (its current iteration finishes),
 *   2. stop accepting connections and let in-flight requests finish,
 *   3. `scope.close()`: refuse new scopes, wait for open ones, end the pool,
 *   4. nothing else: the process exits by itself, with code 0, once nothing
 *      is left running. A timer or socket left open would keep it alive.
 *
 * Run: `DATABASE_URL=… ADAPTER=hono node --import tsx test/reliability/support/shutdown-app.ts`
 * It writes one JSON object per line to stdout: `{ ready: port }`,
 * `{ inflight: n }` when n requests are being handled, `{ closing: true }`
 * once it stopped listening, and `{ shutdown: … }` when it is done.
 */
import { createScope } from '@scoped/core'
import { pgDriver, scopedPool } from '@scoped/pg'
import pg from 'pg'
import { type Adapter, startApp } from './apps.ts'

const say = (o: object) => process.stdout.write(`${JSON.stringify(o)}\n`)

const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL, max: 10 })
const scope = createScope({
  driver: pgDriver(pool),
  name: 'shutdown-app',
  acquireTimeoutMs: 10_000,
})
const db = scopedPool(scope)
const app = await startApp((process.env.ADAPTER ?? 'hono') as Adapter, { scope, db })

let inflight = 0
let answered = 0
app.server.prependListener('request', (_req, res) => {
  inflight++
  if (inflight === Number(process.env.REPORT_INFLIGHT ?? 50)) say({ inflight })
  res.on('close', () => {
    inflight--
    answered++
  })
})

// The worker: each iteration is a unit of work of two rows with a pause between them.
const stopWorker = new AbortController()
let started = 0
let finished = 0
const worker = scope.loop(
  async () => {
    const id = `job${++started}`
    // Finished means committed: an iteration is in flight until its COMMIT is done.
    scope.getSession().afterCommit(() => {
      finished++
    })
    await db.query("INSERT INTO units (id, part) VALUES ($1, 'begin')", [id])
    await db.query('SELECT pg_sleep(0.05)')
    await db.query("INSERT INTO units (id, part) VALUES ($1, 'end')", [id])
  },
  { name: 'worker', signal: stopWorker.signal },
)

process.once('SIGTERM', async () => {
  const t0 = performance.now()
  const atSigterm = { inflight, jobsRunning: started - finished }
  stopWorker.abort()
  const listening = app.closeGracefully()
  say({ closing: true, inflight })
  await listening
  await worker
  await scope.close({ timeoutMs: 10_000 })
  let refused = ''
  try {
    await scope.runJob(async () => {})
  } catch (e) {
    refused = (e as { code?: string }).code ?? String(e)
  }
  say({
    shutdown: {
      ms: Math.round(performance.now() - t0),
      answered,
      inflight,
      atSigterm,
      jobs: { started, finished },
      refused,
      poolEnded: pool.ended,
      pool: { total: pool.totalCount, idle: pool.idleCount, waiting: pool.waitingCount },
      stats: scope.stats(),
    },
  })
})

say({ ready: app.port })
