/**
 * pg-boss plugged into scoped sessions, both ways:
 *
 * - the job handler runs in `runJob`, so everything it calls (the `orders`
 *   data layer, its scoped `db`) uses the job's own session and unit of work;
 * - `sendInUnitOfWork` enqueues through the current session's connection,
 *   so the job exists if and only if the unit of work that asked for it commits.
 */
import type { Orders } from '@examples/shared'
import { runJob } from '@scoped/core'
import { CompiledQuery, type Kysely } from 'kysely'
import type PgBoss from 'pg-boss'

export const QUEUE = 'process-order'

export interface ProcessOrderJob {
  orderId: number
}

/**
 * pg-boss's `db` option: run its SQL on the current session's connection (in
 * its transaction) instead of on pg-boss's own pool.
 */
export function sessionDb(db: Kysely<any>): PgBoss.Db {
  return {
    async executeSql(text, values) {
      const result = await db.executeQuery(CompiledQuery.raw(text, values))
      return { rows: result.rows as any[] }
    },
  }
}

/** Enqueue a job in the current unit of work (a request's, or a job's). */
export function sendInUnitOfWork(boss: PgBoss, db: Kysely<any>, job: ProcessOrderJob) {
  return boss.send(QUEUE, job, { db: sessionDb(db) })
}

export interface WorkOptions {
  worker: string
  workMs: number
  log: (line: string) => void
}

/** Start working the queue: one job at a time, each in its own scoped session. */
export function workOrders(boss: PgBoss, orders: Orders, opts: WorkOptions) {
  return boss.work<ProcessOrderJob>(
    QUEUE,
    { batchSize: 1, pollingIntervalSeconds: 0.5 },
    async ([job]) => {
      if (!job) return
      const { orderId } = job.data
      opts.log(`job ${job.id}: processing order ${orderId}`)
      // The whole handler is one unit of work: COMMIT when it returns, ROLLBACK when it
      // throws (pg-boss then retries the job), the connection released either way.
      const processed = await runJob(
        () => orders.processOne(orderId, { worker: opts.worker, workMs: opts.workMs }),
        {
          name: QUEUE,
          timeoutMs: 30_000,
        },
      )
      opts.log(
        `job ${job.id}: order ${orderId} ${processed ? 'processed' : 'was already processed'}`,
      )
    },
  )
}
