/** A session that holds a pooled connection right now: the answer to "who has the connections?" */
export interface Holder {
  /** Session id, unique within the process. */
  id: string
  /** Session name: the route (`GET /orders/:id`) or the job (`job:sync`). */
  name: string
  /** The request or job id given to `run()`/the adapter, when there is one. */
  requestId?: string
  /** Milliseconds since the connection was checked out. */
  heldMs: number
  /** `querying`: a tracked use is running; `in-transaction`: a transaction is open; else `idle`. */
  state: 'idle' | 'in-transaction' | 'querying'
  /** The first stack frame outside this library at checkout, when `captureStacks` is on. */
  site?: string
  /** The whole stack at checkout, when `captureStacks` is on. */
  stack?: string
}

/**
 * Frames kept in a captured stack. V8 keeps 10 by default, and a query builder,
 * its driver and this library can take all of them (Kysely → `scopedKysely` →
 * `Session.use()` → checkout is 14 frames deep), leaving no frame of the code
 * that made the query.
 */
const STACK_FRAMES = 50

/** An Error whose stack reaches past the libraries to the caller (`captureStacks`). */
export function captureStack(message: string): Error {
  const limit = Error.stackTraceLimit
  // Raised for this one capture only; a higher limit the application chose is kept.
  if (!(limit >= STACK_FRAMES)) Error.stackTraceLimit = STACK_FRAMES
  try {
    return new Error(message)
  } finally {
    Error.stackTraceLimit = limit
  }
}

const internal =
  /node:|node_modules[\\/](@scoped|pg|pg-pool|kysely|hono|@hono|fastify|express|avvio)[\\/]|packages[\\/](core|pg|kysely|hono|fastify|express)[\\/]src[\\/]|\(<anonymous>\)|^\s*at new Promise/

/** The first frame of `stack` that is the user's code, not ours, a driver's or Node's. */
export function callSite(stack: string | undefined): string | undefined {
  if (!stack) return undefined
  const lines = stack.split('\n').slice(1)
  for (const line of lines) {
    if (!internal.test(line)) return line.trim().replace(/^at /, '')
  }
  return lines[0]?.trim().replace(/^at /, '')
}

/** The frames of `stack` that are the user's code (all frames if none is). */
export function userFrames(stack: string | undefined): string | undefined {
  if (!stack) return undefined
  const lines = stack.split('\n').slice(1)
  const mine = lines.filter((l) => !internal.test(l))
  return (mine.length > 0 ? mine : lines).join('\n')
}
