/**
 * One request's unit of work, and the one place that decides when it ends.
 *
 * Fastify reaches the end of a request along several paths, and the unit of
 * work must end exactly once on each of them, never while the handler still
 * runs, and (when it commits) before the client can see the response:
 *
 *   onSend, plain payload ─────────── commit/rollback, THEN the response is written
 *   onSend, stream payload ────────── held until the body's last chunk, then commit, then the end
 *   onSend, rollback, handler running  (handlerTimeout) ── response goes out; ends when the handler settles
 *   'close' before the response ended (client abort, connection/request timeout)
 *       ── abort (rollback-only, optionally cancel the statement); ends once the handler settled
 *   'close' after a hijacked reply ── ends once the handler settled (commitOn decides)
 *
 * `'close'` on the raw response fires on every path, aborts and timeouts
 * included, so it is the backstop; `onResponse` is not (it never fires on abort).
 * AsyncLocalStorage is lost in `req`/`res` listeners, so everything here
 * works from this object, captured in closures, never from `getSession()`.
 */
import type { OpenScope } from '@scoped/core'
import { TransactionStateError } from '@scoped/core'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { defaultCommitOn, type ResolvedOptions } from './options.js'
import { type BodyEnd, scopedStream, scopedWebStream } from './scoped-body.js'

type HandlerState = 'not-started' | 'running' | 'settled'

const objectTag = Object.prototype.toString

const noop = () => {}

/** What `#finishNow` returns when the unit of work cannot end without awaiting. */
const notYet = Symbol('not yet')
/** `#ending` of a unit of work that ended at once, without a failure (one promise for all of them). */
const endedCleanly: Promise<unknown> = Promise.resolve(undefined)

/** @internal */
export class RequestScope {
  readonly open: OpenScope<unknown>
  #reply: FastifyReply
  #options: ResolvedOptions
  /** The first error thrown in the chain, boxed (so `throw undefined` still counts). */
  #error: { value: unknown } | undefined
  #handler: HandlerState = 'not-started'
  /**
   * The promise the handler returned, while it may still be pending. Nothing
   * listens to it until an abort or a rollback needs to know (`#watch`).
   */
  #running: PromiseLike<unknown> | undefined
  #watching = false
  /** onSend ran: a response (or its stream) is on its way. */
  #responded = false
  /** A stream body we wrapped, not ended yet: its end (or failure) ends the unit of work. */
  #body: BodyEnd | undefined
  /** The response went out as a rollback while the handler still ran: end when it settles. */
  #deferred = false
  /** 'close' fired on the raw response. */
  #closed = false
  /** The unit of work is ending; resolves to the commit failure, if any. */
  #ending: Promise<unknown> | undefined
  #commitFailed = false
  /** onSend's first pass, until it handed its payload (or its commit error) on. */
  #firstPass: Promise<void> | undefined

  /** Opens the request's scope (throws what `scope.open()` throws) and watches the response's 'close'. */
  constructor(request: FastifyRequest, reply: FastifyReply, options: ResolvedOptions) {
    this.#reply = reply
    this.#options = options
    // One function serves as the response's 'close' listener and as the lazy default
    // name: the response calls it on itself, core calls `name()` without a receiver. One
    // closure instead of two arrow functions is ~200 B less per request on Node 20. The
    // default name is read only when a session is made (or an error names it): a request
    // that never queries does not look its route up.
    // It is also the request's 'close' listener, added once the request has a session: a
    // pipelined request still queued behind another response when its client leaves gets
    // no 'close' on its response (Node closes its request only), and must still abort.
    // In its listener roles it returns undefined: Node's EventEmitter attaches a catch
    // handler to whatever else a listener returns (~80 instructions per 'close').
    const self = this
    function closeOrName(this: unknown): string {
      if (this === self.#reply.raw) {
        self.#onClose()
        return undefined as unknown as string
      }
      const raw = self.#reply.request.raw
      if (this === raw) {
        if (raw.socket?.destroyed === true) self.#onClose()
        return undefined as unknown as string
      }
      if (this === self.open) {
        raw.on('close', closeOrName)
        return undefined as unknown as string
      }
      return routeName(self.#reply.request)
    }
    const name = options.name ? sessionName(options.name, request) : closeOrName
    const id: unknown = request.id
    this.open = options.scope.open({
      name,
      requestId: typeof id === 'string' ? id : String(id),
      kind: 'request',
      onSession: closeOrName,
    })
    reply.raw.on('close', closeOrName)
  }

  /** onError: remember the first error; any error makes the default commitOn roll back. */
  error(error: unknown): void {
    if (this.#error) return
    this.#error = {
      value:
        error ?? new Error(`${String(error)} was thrown (a non-Error value) in ${this.open.name}`),
    }
  }

  handlerStarted(): void {
    this.#handler = 'running'
  }

  /** The route handler was called (through the plugin's wrapper). */
  get handlerRan(): boolean {
    return this.#handler !== 'not-started'
  }

  /** The route handler returned: a promise may still run (watched only when it matters), anything else is done. */
  handlerReturned(result: unknown): void {
    if (
      result !== null &&
      typeof (result as PromiseLike<unknown> | undefined)?.then === 'function'
    ) {
      this.#running = result as PromiseLike<unknown>
      // A rollback answered, or 'close' came, while the handler ran synchronously: it ends when this settles.
      if (this.#deferred || this.#closed) this.#watch()
    } else {
      this.handlerSettled()
    }
  }

  /** The route handler threw, returned, or its promise settled. */
  handlerSettled(): void {
    this.#handler = 'settled'
    this.#running = undefined
    if (this.#ending) return
    if (this.#body !== undefined && this.#reply.raw.writableEnded) return // its body's end decides
    if (this.#deferred || this.#closed) void this.#finishQuietly(this.#afterClose())
    // Otherwise the reply is on its way: onSend (or, for a hijacked reply, 'close') ends it.
  }

  /** Listen (once) to the handler's promise: handlerSettled when it settles. */
  #watch(): void {
    const running = this.#running
    if (this.#watching || running === undefined) return
    this.#watching = true
    const settled = () => {
      if (this.#running === running) this.handlerSettled()
    }
    // A rejection is an error even when Fastify reports none (a hijacked reply's handler).
    running.then(settled, (error: unknown) => {
      if (this.#running === running) this.error(error)
      settled()
    })
  }

  /**
   * onSend: decide, and for a plain payload end the unit of work before the
   * response is written. May run twice (an error in a later onSend hook, or our
   * own failed commit, sends an error response through it again).
   */
  send(payload: unknown, done: (error: Error | null, payload?: unknown) => void): void {
    // No closure is made on the common path (a closure here would cost every call a
    // context): the paths that need one have their own methods.
    const reply = this.#reply
    if (this.#responded) {
      this.#secondPass(payload, done)
      return
    }
    this.#responded = true
    if (this.#ending) {
      done(null, payload)
      return
    }
    const timedOut =
      (this.#error?.value as { code?: unknown } | undefined)?.code === 'FST_ERR_HANDLER_TIMEOUT'
    if (timedOut) {
      // Fastify answers 503 while the handler (or a hook) still runs: its next statement
      // fails with a timeout error, and its running one is cancelled with cancelOnAbort.
      this.open.abort('timeout', { cancel: this.#options.cancelOnAbort, detail: 'handlerTimeout' })
    }
    const response = isResponse(payload) ? payload : undefined
    let commit: boolean
    try {
      commit =
        this.#decide(response ? response.status : reply.statusCode) &&
        // The client is gone though no 'close' said so: a pipelined response still waiting
        // for its socket never gets one (Node emits it on the request only).
        reply.request.raw.socket?.destroyed !== true
    } catch (error) {
      this.#rollBackThenFail(error as Error, done)
      return
    }
    if (response?.body != null && response.status !== 204 && response.status !== 304) {
      const body = scopedWebStream(
        response.body,
        this.#bodyEnd(commit),
        response.headers.has('content-length'),
      )
      const { status, statusText, headers } = response
      done(null, new Response(body, { status, statusText, headers }))
      return
    }
    if (payload !== null && typeof payload === 'object') {
      if (typeof (payload as NodeJS.ReadableStream).pipe === 'function') {
        done(
          null,
          scopedStream(payload as NodeJS.ReadableStream, this.#bodyEnd(commit), this.#sized()),
        )
        return
      }
      if (typeof (payload as ReadableStream).getReader === 'function') {
        done(null, scopedWebStream(payload as ReadableStream, this.#bodyEnd(commit), this.#sized()))
        return
      }
    }
    if (!commit && (timedOut || this.#handler === 'running')) {
      if (!timedOut && this.#running !== undefined) this.#rollBackWhenKnown(payload, done)
      else this.#rollBackLater(payload, done)
      return
    }
    this.#firstPass = this.#endThenDeliver(commit, payload, done)
  }

  /**
   * A second pass: the error response of our failed commit or of a later onSend hook,
   * or a racing one (a hook sent without `return reply`, so the handler ran too). It
   * waits for the first pass's response, so it can never overtake a committed one.
   */
  #secondPass(payload: unknown, done: (error: Error | null, payload?: unknown) => void): void {
    const reply = this.#reply
    const pass = () => {
      if (this.#commitFailed && reply.statusCode < 500) reply.code(500)
      this.#deliver(done, null, payload)
    }
    if (this.#firstPass) void this.#firstPass.then(pass)
    else pass()
  }

  /** commitOn failed: roll back, then answer with its error. */
  #rollBackThenFail(error: Error, done: (error: Error | null, payload?: unknown) => void): void {
    this.#finish(false).then(() => this.#deliver(done, error))
  }

  /**
   * A rollback, and the handler returned a promise nobody listened to: has it settled
   * (it threw, and this is its error response) or does it still run? Listen to it: if
   * it settled, its reaction runs before this next turn.
   */
  #rollBackWhenKnown(
    payload: unknown,
    done: (error: Error | null, payload?: unknown) => void,
  ): void {
    this.#watch()
    this.#firstPass = endedCleanly.then(() => {
      if (this.#handler === 'running') {
        this.#rollBackLater(payload, (error, value) => this.#deliver(done, error, value))
        return undefined
      }
      return this.#endThenDeliver(false, payload, done)
    })
  }

  /**
   * A rollback answered while the chain still runs (handlerTimeout, or a reply sent
   * before the handler finished): the response goes out now, without waiting for the
   * running statement; the unit of work ends when the handler settles, never under it.
   */
  #rollBackLater(payload: unknown, done: (error: Error | null, payload?: unknown) => void): void {
    this.#deferred = true
    if (this.#handler !== 'running') void this.#finishQuietly(false)
    else this.#watch()
    done(null, payload)
  }

  /**
   * Commit or roll back, then hand the payload on: at once when nothing needs awaiting
   * (no session, or one that never checked a connection out), else after the end.
   * Returns the pending first pass, if there is one.
   */
  #endThenDeliver(
    commit: boolean,
    payload: unknown,
    done: (error: Error | null, payload?: unknown) => void,
  ): Promise<void> | undefined {
    const now = this.#finishNow(commit)
    if (now !== notYet) {
      if (now !== undefined) this.#answerFailed(done, now)
      else this.#deliver(done, null, payload)
      return undefined
    }
    return this.#endThenDeliverLater(commit, payload, done)
  }

  /** #endThenDeliver when the end must be awaited (its own method: its closure costs a context). */
  #endThenDeliverLater(
    commit: boolean,
    payload: unknown,
    done: (error: Error | null, payload?: unknown) => void,
  ): Promise<void> {
    const reply = this.#reply
    const status = reply.statusCode
    const contentType = reply.getHeader('content-type')
    return this.#finish(commit).then((failure) => {
      if (failure !== undefined) {
        this.#answerFailed(done, failure)
        return
      }
      // A racing error response (see the second pass) may have changed the shared reply
      // meanwhile; this response goes out as it was decided.
      if (reply.statusCode !== status) reply.code(status)
      if (contentType !== undefined && reply.getHeader('content-type') === undefined) {
        reply.header('content-type', contentType)
      }
      this.#deliver(done, null, payload)
    })
  }

  /**
   * Hand the payload on after an await. Fastify writes the response inside `done`; if
   * the chain answered on its own meanwhile (a hook that sent without `return reply`
   * and let the handler run), that write throws, and must not become an unhandled rejection.
   */
  #deliver(
    done: (error: Error | null, payload?: unknown) => void,
    error: Error | null,
    payload?: unknown,
  ): void {
    try {
      done(error, payload)
    } catch (writeError) {
      this.#reply.log.error(
        { err: writeError },
        `[scoped] the response of ${this.open.name} was already written by another path`,
      )
    }
  }

  /**
   * The COMMIT failed: Fastify's error handler answers instead, and nothing the
   * handler's response claimed may go with it (a Set-Cookie of a login that
   * rolled back, a Location or ETag of work that was not saved, a Cache-Control
   * that lets a shared cache keep the 500).
   */
  #answerFailed(done: (error: Error | null, payload?: unknown) => void, failure: unknown): void {
    const reply = this.#reply
    for (const name of claimHeaders) reply.removeHeader(name)
    this.#deliver(done, commitError(this.open.name, failure))
  }

  /** The reply declares its length: the client takes the last byte as the end. */
  #sized(): boolean {
    return this.#reply.getHeader('content-length') !== undefined
  }

  #onClose(): void {
    // The response's 'close' and the request's (on a destroyed socket) may both come.
    if (this.#closed) return
    this.#closed = true
    const res = this.#reply.raw
    if (!res.writableEnded) {
      // The response was not ended: the client went away, or a timeout cut it off. (Ended
      // but not flushed means the app finished its response; that is not an abort.)
      const timeout = (res as TimedOut)[kTimedOut] === true || isRequestTimeout(this.#reply)
      this.open.abort(timeout ? 'timeout' : 'client-abort', {
        cancel: this.#options.cancelOnAbort,
        ...(timeout && { detail: 'the server timed the connection out' }),
      })
    }
    if (this.#ending) return
    const body = this.#body
    if (body !== undefined && res.writableEnded) {
      // The response ended while the stream body we wrapped is still being read (a HEAD
      // answered without it: Fastify drains the stream): the body's end decides.
      if (body.read) return
      // Never read, and now never will be: a later onSend hook replaced it (a 304) or
      // failed (its error response went out instead), or a 204 left a web stream unread.
      // Stop its source, and decide on the response that went out.
      this.#body = undefined
      body.abandon()
      if (this.#handler !== 'running') {
        void this.#finishQuietly(this.#decideQuietly(res.statusCode))
        return
      }
    }
    if (this.#handler === 'running') {
      // It ends when the handler settles.
      this.#watch()
      return
    }
    void this.#finishQuietly(this.#afterClose())
  }

  /**
   * Commit at the end of a response that did not pass through onSend's decision:
   * only a hijacked reply that completed, and only if commitOn agrees.
   */
  #afterClose(): boolean {
    const res = this.#reply.raw
    if (this.#deferred || this.#responded || !this.#closed || !res.writableEnded) return false
    return this.#decideQuietly(res.statusCode)
  }

  /** #decide where nobody can be answered any more: a commitOn that fails is logged, and rolls back. */
  #decideQuietly(status: number): boolean {
    try {
      return this.#decide(status)
    } catch (error) {
      this.#reply.log.error(
        { err: error },
        `[scoped] commitOn failed for ${this.open.name}; rolling back`,
      )
      return false
    }
  }

  /** commitOn, guarded: an aborted request never commits; a non-boolean answer is a bug. */
  #decide(status: number): boolean {
    if (this.open.aborted) return false
    const commitOn = this.#options.commitOn
    // The default, without making its argument (#error boxes even an undefined error).
    if (commitOn === defaultCommitOn) return this.#error === undefined && status < 500
    const answer = commitOn({ status, error: this.#error?.value })
    if (typeof answer !== 'boolean') {
      throw new TypeError(
        `scopedSession({ commitOn }): expected a boolean, got ${answer === null ? 'null' : typeof answer}` +
          ((answer as unknown) instanceof Promise
            ? ' (commitOn must be synchronous: it decides before the response is sent)'
            : ''),
      )
    }
    return answer
  }

  #bodyEnd(commit: boolean): BodyEnd {
    const body: BodyEnd = {
      read: false,
      abandon: noop,
      enter: (fn) => this.open.enter(fn),
      end: () => {
        this.#body = undefined
        return this.#finish(commit).then((failure) => {
          if (failure === undefined) return undefined
          const error = commitError(this.open.name, failure)
          // Fastify ends a failed body with res.destroy() and no error: on HTTP/1 the socket
          // is cut, but an HTTP/2 stream then ends with RST_STREAM(NO_ERROR), which clients
          // read as a clean end. Destroyed with the error, it resets with INTERNAL_ERROR.
          if (this.#reply.request.raw.httpVersionMajor === 2) this.#reply.raw.destroy(error)
          return error
        })
      },
      fail: () => {
        this.#body = undefined
        // Fastify's HEAD route cancels a web stream body instead of draining it (a Node
        // stream it drains, and that commits): nothing was cut off, the decision stands.
        const head = this.#reply.request.raw.method === 'HEAD' && this.open.aborted === undefined
        void this.#finishQuietly(head && commit)
      },
    }
    this.#body = body
    return body
  }

  /** End the unit of work, once. Resolves to what made a requested commit fail (undefined when nothing did). */
  #finish(commit: boolean): Promise<unknown> {
    if (this.#ending || this.#finishNow(commit) !== notYet) return this.#ending!
    this.#ending = this.open.end({ commit }).then(
      () => undefined,
      (error: unknown) => this.#failed(commit, error),
    )
    return this.#ending
  }

  /**
   * End the unit of work at once if nothing needs awaiting (most requests that never
   * touched the database): what made a requested commit fail (undefined when nothing
   * did), or `notYet` (having done nothing) when #finish must await the end.
   */
  #finishNow(commit: boolean): unknown {
    if (this.#ending) return notYet
    try {
      if (!this.open.endNow(commit)) return notYet
    } catch (error) {
      const failure = this.#failed(commit, error)
      this.#ending = Promise.resolve(failure)
      return failure
    }
    this.#ending = endedCleanly
    return undefined
  }

  /** The end failed: a failed commit is what #finish resolves to; a failed rollback is a bug, logged. */
  #failed(commit: boolean, error: unknown): unknown {
    if (commit) {
      this.#commitFailed = true
      return error ?? new Error('commit failed')
    }
    // A rollback does not fail (the core destroys a connection it cannot roll back); this is a bug.
    this.#reply.log.error(
      { err: error },
      `[scoped] ending the unit of work of ${this.open.name} failed`,
    )
    return undefined
  }

  /** #finish where nobody waits for the outcome (the response is gone): a failed commit is logged. */
  #finishQuietly(commit: boolean): Promise<void> {
    const first = !this.#ending
    return this.#finish(commit).then((failure) => {
      if (first && failure !== undefined) {
        this.#reply.log.error(
          { err: failure },
          `[scoped] the unit of work of ${this.open.name} was not committed`,
        )
      }
    })
  }
}

/** The default session name: `GET /orders/:id`, `GET (no route)` for a 404. */
function routeName(request: FastifyRequest): string {
  return `${request.method} ${request.routeOptions.url ?? '(no route)'}`
}

function sessionName(name: (request: FastifyRequest) => string, request: FastifyRequest): string {
  const value = name(request)
  if (typeof value !== 'string' || value === '') {
    throw new TypeError(
      `scopedSession({ name }): expected name(request) to return a non-empty string, got ${
        value === '' ? 'an empty string' : typeof value
      }`,
    )
  }
  return value
}

function isResponse(payload: unknown): payload is Response {
  return (
    payload !== null &&
    typeof payload === 'object' &&
    objectTag.call(payload) === '[object Response]'
  )
}

/** Set on a response whose socket timed out (connectionTimeout) while it was the one in flight. */
const kTimedOut = Symbol('scoped.timedOut')
/** Set on a socket once it is watched for timeouts. */
const kWatched = Symbol('scoped.watched')

type TimedOut = { [kTimedOut]?: true }

/**
 * Watch the request's socket for a connection timeout (once per socket), so the
 * coming 'close' is reported as a timeout, not a client abort. One listener per
 * connection instead of Fastify's onTimeout hook, which costs an object per request.
 * Node destroys the socket in its own earlier 'timeout' listener; this one only marks
 * the response in flight.
 */
export function watchTimeout(socket: unknown): void {
  const s = socket as {
    [kWatched]?: true
    on?: (event: 'timeout', fn: () => void) => unknown
  } | null
  if (!s || s[kWatched] === true || typeof s.on !== 'function') return
  s[kWatched] = true
  s.on('timeout', onSocketTimeout)
}

function onSocketTimeout(this: { _httpMessage?: unknown }): void {
  const res = this._httpMessage as TimedOut | null | undefined
  if (res) res[kTimedOut] = true
}

/** Node's `requestTimeout` ends the socket with ERR_HTTP_REQUEST_TIMEOUT (Fastify answers 408). */
function isRequestTimeout(reply: FastifyReply): boolean {
  const socket = reply.request.raw.socket as { errored?: { code?: unknown } | null } | null
  return socket?.errored?.code === 'ERR_HTTP_REQUEST_TIMEOUT'
}

/**
 * Headers that describe the body or the state the failed response claimed, or
 * how long it may be cached (a shared cache must not keep the 500 under the
 * handler's `public, max-age`); its 500 must not keep them.
 */
const claimHeaders = [
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
]

/** The error that replaces a response whose unit of work could not be committed: always a 500. */
function commitError(name: string, cause: unknown): Error {
  const reason = cause instanceof Error ? cause.message : String(cause)
  const error = new TransactionStateError(
    `The unit of work of '${name}' was not committed, so its response was replaced by this error: ${reason}`,
    { cause },
  )
  return Object.assign(error, { statusCode: 500 })
}
