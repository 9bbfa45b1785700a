/**
 * One request's unit of work, from the middleware's `next()` (or the call of
 * `app.fetch` in `scopedFetch()`) to the last byte: who may abort it, when it
 * ends, and the backstop that ends it when nothing else did. "The chain" is
 * what runs inside the scope: the rest of Hono's chain, or the whole app.
 *
 *   chain running ──next() settled──▶ chain done ──end()──▶ ended
 *        │                               │  (live body: end() when the body ends)
 *        └─ client gone: abort ──────────┘
 *   raw response 'close' after the chain settled: end() (rollback) if still open
 *
 * The raw response is watched (watch()) from the scope's first session on, or
 * when the chain settled on a path that outlives it; a request that never made
 * a session and ends when the chain settles is never watched.
 *
 * `AsyncLocalStorage` is lost in `req`/`res` event listeners, so every
 * listener here reaches the scope through `this`, never through getSession().
 */
import type { OpenScope, Scope } from '@scoped/core'
import { channels } from '@scoped/core'
import { type BodyState, liveBody } from './response-body.js'

/** The parts of node's `ServerResponse` (`env.outgoing` on `@hono/node-server`) we rely on. */
interface RawResponse {
  /**
   * `end()` was called: the response was complete when it closed. (Not
   * `writableFinished`: Node's HTTP/2 response reports that true after a
   * client's RST_STREAM too.)
   */
  readonly writableEnded: boolean
  readonly closed?: boolean
  on(event: 'close', listener: () => void): unknown
}

function rawResponse(env: unknown): RawResponse | undefined {
  if (typeof env !== 'object' || env === null) return undefined
  const out = (env as { outgoing?: Partial<RawResponse> }).outgoing
  if (out && typeof out.on === 'function' && typeof out.writableEnded === 'boolean') {
    return out as RawResponse
  }
  return undefined
}

const noop = () => {}

/** Hono's `timeout()` throws an HTTPException 504; others use 408 or a `TimeoutError`. */
export function isTimeout(error: unknown): boolean {
  if (!(error instanceof Error)) return false
  const status = (error as { status?: unknown }).status
  return status === 504 || status === 408 || error.name === 'TimeoutError'
}

export class RequestLifecycle<C> {
  #open: OpenScope<C>
  #scope: Scope<C>
  #cancelOnAbort: boolean
  /** The request's `env` (`c.env`: `{ incoming, outgoing }` on node-server) and request, until watch() started watching. */
  #env: unknown
  #request: Request | undefined
  #chainDone = false
  /** The raw response closed before the chain settled: nothing will read a body now. */
  #closedEarly = false
  /** The response is over (closed, finished or not), or the client is gone: nothing more will be sent. */
  #closed = false
  /** Those waiting for `whenGone()`. */
  #goneWaiters: (() => void)[] | undefined
  #aborted = false
  #ending: Promise<unknown> | undefined
  /** The live body's source, while it is being sent. */
  #source: ReadableStreamDefaultReader<unknown> | undefined

  /**
   * The Error the app's error handler answered last (set by `scopedFetch()`'s
   * wrapper of `app.errorHandler`; the middleware reads `c.error` instead).
   */
  answered: unknown = undefined

  constructor(
    open: OpenScope<C>,
    scope: Scope<C>,
    cancelOnAbort: boolean,
    env: unknown,
    request: Request,
  ) {
    this.#open = open
    this.#scope = scope
    this.#cancelOnAbort = cancelOnAbort
    this.#env = env
    this.#request = request
  }

  /** The scope this request's unit of work belongs to. */
  get scope(): Scope<C> {
    return this.#scope
  }

  /**
   * Start watching the response (once): from the scope's first session on, or
   * when the chain settled on any path but the one that ends at once. Before
   * either, a client that left has nothing to abort.
   */
  watch(): void {
    const request = this.#request
    if (request === undefined) return
    this.#request = undefined
    const raw = rawResponse(this.#env)
    this.#env = undefined
    if (raw) {
      // 'close' fires on every path: after a clean finish, on client aborts, on
      // socket timeouts. Before the finish it means the client is gone.
      if (raw.closed) this.#gone(raw.writableEnded)
      else raw.on('close', () => this.#gone(raw.writableEnded))
    } else {
      // Other runtimes (Bun, Deno, app.request()): the request's signal is all there is.
      const signal = request.signal
      if (signal.aborted) this.#gone(false)
      else signal.addEventListener('abort', () => this.#gone(false), { once: true })
    }
  }

  /**
   * `scopedFetch()`: the app's error handler is answering `error` (last one
   * wins, as its response does). A timeout aborts at once: the handler still
   * runs, and its running statement is cancelled.
   */
  errorAnswered(error: unknown): void {
    if (this.#open.ended) return // an orphan's late error, after the request ended
    this.answered = error
    if (isTimeout(error)) this.abort('timeout', true)
  }

  /** The chain after the middleware settled: from now on a 'close' ends the unit of work. */
  chainSettled(): void {
    this.#chainDone = true
  }

  /**
   * The chain threw or rejected instead of answering (`next()` in the
   * middleware, `app.fetch` in `scopedFetch()`): a non-Error, since Hono hands
   * Errors to the error handler, or what the error handler threw; or a
   * commitOn that threw. Roll back, then pass it on.
   */
  async chainThrew(thrown: unknown): Promise<never> {
    this.#chainDone = true
    await this.rollback()
    throw thrown
  }

  /** The response is over or its client gone (seen once watched): a body made now is never sent. */
  get closed(): boolean {
    return this.#closed
  }

  /** Resolves once the response is over or its client gone (after watch()). */
  whenGone(): Promise<void> {
    if (this.#closed) return Promise.resolve()
    this.#goneWaiters ??= []
    const waiters = this.#goneWaiters
    return new Promise((resolve) => {
      waiters.push(resolve)
    })
  }

  /** The unit of work was aborted: the client went away (or its socket was destroyed), or a timeout. */
  get aborted(): boolean {
    return this.#aborted
  }

  /** Abort the unit of work: rollback-only, `session.signal` aborts, optionally cancel the statement. */
  abort(kind: 'client-abort' | 'timeout', cancel: boolean): void {
    // Once end() started, the outcome is being written to the database; an
    // abort now would only make end() report a commit that did happen as failed.
    if (this.#ending || this.#open.ended) return
    this.#aborted = true
    this.#open.abort(kind, { cancel })
  }

  /**
   * `end()` at once, when the unit of work has nothing to wait for (it never
   * queried, or ran autocommit statements only): true when it ended, false
   * (having done nothing) when the caller must await `end()`. Throws what
   * `end()` would reject with; later `end()` calls share the outcome.
   */
  endNow(commit: boolean): boolean {
    if (this.#ending) return false
    return this.#open.endNow(commit && !this.#aborted)
  }

  /** End the unit of work once (COMMIT when `commit` and not aborted); later calls share the first. */
  end(commit: boolean): Promise<unknown> {
    this.#ending ??= this.#open.end({ commit: commit && !this.#aborted })
    return this.#ending
  }

  /** End with a rollback, for paths that have an error of their own to report. */
  async rollback(): Promise<void> {
    try {
      await this.end(false)
    } catch (e) {
      this.report(e, 'rollback at the end of the request')
    }
  }

  /**
   * A response carrying the live body: the unit of work ends when the body
   * ends (COMMIT if `commit`), and a failed COMMIT errors the body, so the
   * client sees the response break off instead of ending cleanly.
   */
  liveResponse(
    res: Response,
    state: Extract<BodyState, { kind: 'live' }>,
    commit: boolean,
  ): Response {
    if (this.#closedEarly || this.#closed) {
      // The response ended before there was a body to send (a handler that
      // wrote to the raw response itself, a client gone while the body was
      // read ahead): nobody will ever read this one.
      state.reader.cancel().catch(noop)
      this.end(false).catch(noop)
      return res
    }
    this.#source = state.reader
    const body = liveBody(state, res.headers.has('content-length'), {
      finish: async (ok) => {
        this.#source = undefined
        const wanted = ok && commit
        try {
          await this.end(wanted)
          return undefined
        } catch (error) {
          if (!wanted) return undefined
          this.report(
            error,
            `COMMIT of '${this.#open.name}' after its streamed response (the response was cut off)`,
          )
          return { error }
        }
      },
      cancelled: () => {
        this.#source = undefined
        this.abort('client-abort', this.#cancelOnAbort)
        this.end(false).catch(noop)
      },
    })
    // Not statusText: on node-server's lightweight Response it would rebuild the body we now read.
    return new Response(body as ReadableStream<Uint8Array>, {
      status: res.status,
      headers: res.headers,
    })
  }

  #gone(finished: boolean): void {
    this.#closed = true
    const waiters = this.#goneWaiters
    this.#goneWaiters = undefined
    if (waiters) for (const w of waiters) w()
    if (this.#open.ended) return // it ended before the response did: nothing left to do
    if (!finished) this.abort('client-abort', this.#cancelOnAbort)
    if (!this.#chainDone) {
      this.#closedEarly = true
      return // the middleware ends it when the handler settles
    }
    // The backstop: the response is over, whatever happened to it (a live body
    // nobody read, a HEAD request, a socket destroyed mid-body).
    const source = this.#source
    this.#source = undefined
    source?.cancel().catch(noop)
    this.end(false).catch(noop)
  }

  /** Report an error that no response can carry any more (scope onError / logger, diagnostics). */
  report(error: unknown, during: string): void {
    const session = this.#open.existingSession
    if (channels.error.hasSubscribers) {
      channels.error.publish({ scope: this.#scope.name, session, error, during })
    }
    const { onError, logger } = this.#scope.options
    if (onError) onError(error, { during, session: this.#open.name })
    else logger.error(`[scoped/hono] ${during} failed (scope '${this.#scope.name}'):`, error)
  }
}
