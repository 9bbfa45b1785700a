/**
 * A response body that is produced after the handler returned (a stream
 * payload) keeps the request's session until its last chunk, and its clean
 * end waits for the COMMIT: the last chunk is only followed by the end of the
 * response once the unit of work is committed. A failed commit errors the
 * body instead, and Fastify cuts the response off, so the client never sees a
 * clean end of work that was not saved.
 *
 * The source is always read from inside the request's scope, whatever context
 * asks for the next chunk: `getSession()` in a generator behind
 * `Readable.from()` works even when the reply was sent from a callback that
 * runs outside AsyncLocalStorage (an EventEmitter listener, a `req` event).
 */
import { Readable } from 'node:stream'

/** @internal How a wrapped body talks to its request's unit of work. */
export interface BodyEnd {
  /** Run `fn` inside the request's scope. */
  enter<T>(fn: () => T): T
  /** The body has ended: end the unit of work; resolves to what made a commit fail, if anything did. */
  end(): Promise<unknown>
  /** The body failed or was cut off: roll back. */
  fail(): void
  /** Set by the wrapper once someone asked it for a chunk. */
  read: boolean
  /**
   * Set by the wrapper: stop the source of a body nobody will read (the response ended
   * without it), without ending the unit of work (the caller does).
   */
  abandon: () => void
}

const noop = () => {}

/** What `LastHeld.pass()` returns when it keeps the chunk back and has nothing to pass on yet. */
const nothing = Symbol('nothing')

/**
 * With `holdLast`, each chunk is passed on only once the next one came, so the
 * last one is still here when the source ends; without, every chunk at once.
 */
class LastHeld {
  #hold: boolean
  #held: unknown = nothing
  constructor(holdLast: boolean) {
    this.#hold = holdLast
  }
  /** The chunk to pass on now for `chunk`, or `nothing`. */
  pass(chunk: unknown): unknown {
    if (!this.#hold) return chunk
    const previous = this.#held
    this.#held = chunk
    return previous
  }
  /** The chunk kept back at the end, or `nothing`. */
  get last(): unknown {
    return this.#held
  }
}

/**
 * @internal A Node.js stream payload (anything with `pipe()`). With
 * `holdLast` (the reply has a Content-Length, so its last byte ends the
 * response for the client) each chunk is passed on only once the next one
 * is read: the last one waits for the COMMIT.
 */
export function scopedStream(
  source: NodeJS.ReadableStream,
  body: BodyEnd,
  holdLast = false,
): Readable {
  const readable =
    typeof (source as Readable)[Symbol.asyncIterator] === 'function'
      ? (source as Readable)
      : new Readable({ objectMode: true }).wrap(source)
  let iterator: AsyncIterator<unknown> | undefined
  let pulling = false
  let over = false
  const hold = new LastHeld(holdLast)
  const out = new Readable({
    read() {
      body.read = true
      if (pulling) return
      pulling = true
      body.enter(pump)
    },
    destroy(error, callback) {
      if (!over) {
        // Cut off (client gone, timeout): stop the source and roll back. The iterator's
        // return() waits behind a pending next() (a source idle, waiting for data), so
        // the source is destroyed too.
        over = true
        body.fail()
        iterator?.return?.().catch(noop)
        ;(readable as Readable).destroy?.()
      }
      callback(error)
    },
  })
  body.abandon = () => {
    if (over) return
    over = true
    ;(readable as Readable).destroy?.()
    out.destroy()
  }

  async function pump(): Promise<void> {
    try {
      iterator ??= readable[Symbol.asyncIterator]()
      for (;;) {
        const next = await iterator.next()
        if (out.destroyed) return
        if (next.done) {
          over = true
          const failure = await body.end()
          if (failure === undefined) {
            if (hold.last !== nothing) out.push(hold.last)
            out.push(null)
          } else out.destroy(failure instanceof Error ? failure : new Error(String(failure)))
          return
        }
        const chunk = hold.pass(next.value)
        if (chunk === nothing) continue
        if (!out.push(chunk)) {
          pulling = false
          return
        }
      }
    } catch (error) {
      if (!over) {
        over = true
        body.fail()
      }
      out.destroy(error instanceof Error ? error : new Error(String(error)))
    }
  }

  return out
}

/** @internal A web `ReadableStream` payload (or a `Response`'s body); `holdLast` as for scopedStream. */
export function scopedWebStream(
  source: ReadableStream,
  body: BodyEnd,
  holdLast = false,
): ReadableStream {
  const reader = source.getReader()
  let over = false
  const hold = new LastHeld(holdLast)
  body.abandon = () => {
    if (over) return
    over = true
    reader.cancel().catch(noop)
  }
  return new ReadableStream(
    {
      pull(controller) {
        body.read = true
        return body.enter(async () => {
          for (;;) {
            let next: { done: boolean; value?: unknown }
            try {
              next = await reader.read()
            } catch (error) {
              over = true
              body.fail()
              throw error
            }
            if (!next.done) {
              const chunk = hold.pass(next.value)
              if (chunk === nothing) continue
              controller.enqueue(chunk)
              return
            }
            over = true
            const failure = await body.end()
            if (failure === undefined) {
              if (hold.last !== nothing) controller.enqueue(hold.last)
              controller.close()
            } else controller.error(failure)
            return
          }
        })
      },
      cancel(reason) {
        if (!over) {
          over = true
          body.fail()
        }
        return reader.cancel(reason)
      },
    },
    // Pulled only when read: a body nobody reads is told apart from one being read.
    { highWaterMark: 0 },
  )
}
