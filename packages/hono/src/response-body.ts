/**
 * Is the response body finished when the chain returns, or is it still being
 * produced (Hono's `stream()`, `streamSSE()`, a `ReadableStream` the handler
 * feeds)?
 *
 * A finished body lets the unit of work COMMIT before the status line is
 * sent, so a failed commit can still become a 500. A body still being
 * produced may query the database while it streams, so its session must live
 * until the body ends; then the commit can only end the response abnormally.
 *
 * There is no flag that says which one a `Response` is (a `c.json()` body is
 * a `ReadableStream` too, once any middleware re-wraps the response), so we
 * ask the body itself: strings, bytes and blobs are finished by definition;
 * a stream is read ahead for as long as it delivers without waiting for I/O
 * (at most `readAheadLimit` bytes). If it reaches its end, it was finished
 * and is replaced by the bytes read; if a read has to wait, its producer is
 * still at work and the body is live. Either answer is safe: a live body
 * never shows the client a clean end before the COMMIT succeeded.
 *
 * An encoded body (`Content-Encoding`, e.g. from `compress()`) is the
 * exception: its bytes come from zlib's thread pool, so even a finished
 * `c.json()` waits for I/O there, and would pass for live. It is read ahead
 * without that limit (up to `readAheadLimit` bytes, or until the client is
 * gone): the status line then waits for the encoder, which holds output back
 * anyway, and a finished body still commits before it is sent.
 */

/** Read at most this much of a stream body ahead to learn whether it is finished. */
export const readAheadLimit = 64 * 1024

export type BodyState =
  /** No body, or a body that cannot change: send `replacement` (when set) instead of the original. */
  | { kind: 'finished'; replacement?: Response }
  /** A body still being produced: `chunks` were read ahead, `pending` is the read in flight. */
  | {
      kind: 'live'
      reader: ReadableStreamDefaultReader<unknown>
      chunks: unknown[]
      pending: Promise<ReadResult> | undefined
    }
  /** Reading the body failed: the response cannot be sent as it is. */
  | { kind: 'failed'; error: unknown }

type ReadResult = Awaited<ReturnType<ReadableStreamDefaultReader<unknown>['read']>>

const waiting = Symbol('waiting')

/**
 * `@hono/node-server` replaces the global `Response` with a lightweight one
 * that keeps `[status, body, headers]` under a private symbol and skips the
 * web stream for string bodies. Looking there first keeps that fast path:
 * touching `.body` would build the full Response. Found by its description
 * because the symbol is not exported; without it we fall back to `.body`.
 */
let cacheSymbol: symbol | null | undefined

function lightweightBody(res: Response): { body: unknown } | undefined {
  if (cacheSymbol === null) return undefined
  if (cacheSymbol === undefined) {
    const found = Object.getOwnPropertySymbols(res).find((s) => s.description === 'cache')
    if (!found) return undefined // learnt from the first response that has one
    cacheSymbol = found
  }
  const cache = (res as unknown as Record<symbol, unknown>)[cacheSymbol]
  return Array.isArray(cache) ? { body: cache[1] } : undefined
}

function isFixed(body: unknown): boolean {
  return (
    body === null ||
    body === undefined ||
    typeof body === 'string' ||
    body instanceof Uint8Array ||
    body instanceof ArrayBuffer ||
    body instanceof Blob
  )
}

/**
 * True when `res`'s body is finished without reading it (no body, a string,
 * bytes, a blob on node-server's lightweight Response); false when only
 * `inspectBody()` can tell.
 */
export function bodyIsFinished(res: Response): boolean {
  const cached = lightweightBody(res)
  return cached !== undefined && isFixed(cached.body)
}

/** `waiting`, after a few microtask hops: bodies already in memory are read by then. */
function hops(): Promise<typeof waiting> {
  return Promise.resolve()
    .then(() => undefined)
    .then(() => waiting)
}

/** Resolve with `p`, or with `waiting` if it needs more than the current turn of the event loop. */
async function soon<T>(p: Promise<T>): Promise<T | typeof waiting> {
  // Most bodies resolve within microtasks; only the rest pay for a macrotask turn.
  const quick = await Promise.race([p, hops()])
  if (quick !== waiting) return quick
  return new Promise((resolve, reject) => {
    const t = setImmediate(() => resolve(waiting))
    p.then(
      (v) => {
        clearImmediate(t)
        resolve(v)
      },
      (e) => {
        clearImmediate(t)
        reject(e)
      },
    )
  })
}

/** The body's stream, or null when it has none (or a fixed one) — without building a full Response. */
function streamOf(res: Response): ReadableStream<unknown> | null {
  const cached = lightweightBody(res)
  const body = cached ? cached.body : res.body
  return body !== null && typeof (body as ReadableStream | undefined)?.getReader === 'function'
    ? (body as ReadableStream<unknown>)
    : null
}

/**
 * Cancel the body of a response that will never be sent (its client is gone):
 * a producer blocked on writing to it (Hono's `stream()`) is released, and
 * with it whatever session work waits on that write.
 */
export function cancelBody(res: Response): void {
  const stream = streamOf(res)
  if (stream !== null && !stream.locked) stream.cancel().catch(() => {})
}

function isEncoded(res: Response): boolean {
  const encoding = res.headers.get('content-encoding')
  return encoding !== null && encoding !== '' && encoding !== 'identity'
}

/**
 * Find out whether `res`'s body is finished; see the module comment.
 * `gone` resolves when the client is gone: an encoded body is read ahead
 * until then at most.
 */
export async function inspectBody(
  res: Response,
  gone?: () => Promise<unknown>,
): Promise<BodyState> {
  // Strings, bytes, blobs and no body at all have no stream: finished by definition.
  const stream = streamOf(res)
  if (stream === null) return { kind: 'finished' }
  // Someone else reads it already: nothing we can hold back, so treat it as sent.
  if (stream.locked) return { kind: 'finished' }
  const reader = stream.getReader()
  const chunks: Uint8Array[] = []
  let size = 0
  const untilGone =
    gone !== undefined && isEncoded(res) ? gone().then((): typeof waiting => waiting) : undefined
  try {
    for (;;) {
      const pending = reader.read()
      const r = untilGone ? await Promise.race([pending, untilGone]) : await soon(pending)
      if (r === waiting) return { kind: 'live', reader, chunks, pending }
      if (r.done) break
      if (!(r.value instanceof Uint8Array)) {
        return { kind: 'live', reader, chunks: [...chunks, r.value], pending: undefined }
      }
      chunks.push(r.value)
      size += r.value.byteLength
      if (size > readAheadLimit) return { kind: 'live', reader, chunks, pending: undefined }
    }
  } catch (error) {
    return { kind: 'failed', error }
  }
  const bytes = new Uint8Array(size)
  let at = 0
  for (const c of chunks) {
    bytes.set(c, at)
    at += c.byteLength
  }
  // Not statusText: on the lightweight Response it would rebuild the full one from the stream we just read.
  return {
    kind: 'finished',
    replacement: new Response(bytes, { status: res.status, headers: res.headers }),
  }
}

export interface LiveBodyHooks {
  /** The producer's body ended (`ok`) or failed: end the unit of work; resolve with the commit's error, if any. */
  finish(ok: boolean): Promise<{ error: unknown } | undefined>
  /** The consumer cancelled (the client went away). */
  cancelled(reason: unknown): void
}

/**
 * The live body, passed through chunk by chunk, except its end: the stream
 * closes only after `finish(true)` resolved without error, and errors
 * otherwise, so a client never sees a clean end of a unit of work that did
 * not commit. With a Content-Length the last chunk is held back too, since
 * the client would take the last byte as the end.
 */
export function liveBody(
  state: Extract<BodyState, { kind: 'live' }>,
  holdLast: boolean,
  hooks: LiveBodyHooks,
): ReadableStream<unknown> {
  const { reader } = state
  const buffered = state.chunks
  let pending = state.pending
  let held: unknown
  let holding = false
  let ended = false
  const next = (): Promise<ReadResult> => {
    if (buffered.length > 0) return Promise.resolve({ done: false, value: buffered.shift() })
    if (pending) {
      const p = pending
      pending = undefined
      return p
    }
    return reader.read()
  }
  return new ReadableStream<unknown>({
    async pull(controller) {
      for (;;) {
        let r: ReadResult
        try {
          r = await next()
        } catch (error) {
          ended = true
          await hooks.finish(false)
          controller.error(error)
          return
        }
        if (r.done) {
          ended = true
          const failed = await hooks.finish(true)
          if (failed) {
            controller.error(failed.error)
            return
          }
          if (holding) controller.enqueue(held)
          controller.close()
          return
        }
        if (!holdLast) {
          controller.enqueue(r.value)
          return
        }
        const previous = held
        const had = holding
        held = r.value
        holding = true
        if (had) {
          controller.enqueue(previous)
          return
        }
      }
    },
    cancel(reason) {
      if (ended) return
      ended = true
      reader.cancel(reason).catch(() => {})
      hooks.cancelled(reason)
    },
  })
}

/**
 * Headers that describe the body or the state the response claims (what it
 * stored, where it now is, who is logged in), or how long it may be cached
 * (a shared cache must not keep the 500 under the handler's `public,
 * max-age`): a failed COMMIT's 500 must not carry them. The same list as
 * `@scoped/fastify`; `@scoped/express` drops the others and answers
 * `Cache-Control: no-store` instead of the handler's.
 */
export const claimHeaders: ReadonlySet<string> = new Set([
  'cache-control',
  'expires',
  'content-type',
  'content-length',
  'content-encoding',
  'content-language',
  'content-range',
  'content-disposition',
  'content-location',
  'etag',
  'last-modified',
  'location',
  'set-cookie',
  'transfer-encoding',
])

/**
 * The headers of a discarded response that its replacement keeps: all but the
 * claim headers, so those of middleware that answers for every request (CORS,
 * request ids) reach the client with the 500, as on Hono's own error path.
 */
export function keptHeaders(headers: Headers): [name: string, value: string][] {
  const kept: [string, string][] = []
  for (const [name, value] of headers) if (!claimHeaders.has(name)) kept.push([name, value])
  return kept
}
