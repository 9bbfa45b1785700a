/**
 * The worker's loop: every iteration claims a batch of new orders and
 * processes them in one job (one session, one unit of work). A failed
 * iteration rolls back, is reported, and the loop backs off before the next.
 */
import type { Orders } from '@examples/shared'
import { getSession, loop } from '@scoped/core'

export interface WorkerOptions {
  /** Written to `processed_by`. */
  worker: string
  /** Orders claimed per iteration. */
  batch: number
  /** Simulated work per order (a call to a payment or shipping service), in ms. */
  workMs: number
  /** Pause after each iteration. */
  intervalMs: number
  /** Stops the loop after the current iteration. */
  signal: AbortSignal
  log: (line: string) => void
}

export async function processNewOrders(orders: Orders, opts: WorkerOptions): Promise<void> {
  await loop(
    async function processNew() {
      // Runs inside runJob: `orders` (its scoped `db`) uses this iteration's session.
      const done = await orders.processNew({
        worker: opts.worker,
        limit: opts.batch,
        workMs: opts.workMs,
        onClaim: (ids) => opts.log(`claimed orders ${ids.join(', ')}`),
      })
      // Said once it is true: after the COMMIT, not when the UPDATEs were sent.
      if (done.length > 0)
        getSession().afterCommit(() => opts.log(`processed orders ${done.join(', ')}`))
    },
    // The signal stops the loop, not the iteration: the job in progress finishes and commits.
    {
      name: 'process-new-orders',
      signal: opts.signal,
      intervalMs: opts.intervalMs,
      timeoutMs: 60_000,
    },
  )
}
