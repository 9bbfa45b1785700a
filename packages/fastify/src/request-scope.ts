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
import type { FastifyReply } from 'fastify'
import type { ResolvedOptions } from './options.js'
import { type BodyEnd, scopedStream, scopedWebStream } from './scoped-body.js'

type HandlerState = 'not-started' | 'running' | 'settled'

const objectTag = Object.prototype.toString

/** @internal */
export class RequestScope {
  readonly open: OpenScope<unknown>
  #reply: FastifyReply
  #options: ResolvedOptions
  /** The first error thrown in the chain, boxed (so `throw undefined` still counts). */
  #error: { value: unknown } | undefined
  #handler: HandlerState = 'not-started'
  /** onSend ran: a response (or its stream) is on its way. */
  #responded = false
  /** The response went out as a rollback while the handler still ran: end when it settles. */
  #deferred = false
  /** 'close' fired on the raw response. */
  #closed = false
  /** A connection timeout fired (Fastify's onTimeout): an abort is a timeout, not the client. */
  #timedOut = false
  /** The unit of work is ending; resolves to the commit failure, if any. */
  #ending: Promise<unknown> | undefined
  #commitFailed = false
  /** onSend's first pass, until it handed its payload (or its commit error) on. */
  #firstPass: Promise<void> | undefined

  constructor(open: OpenScope<unknown>, reply: FastifyReply, options: ResolvedOptions) {
    this.open = open
    this.#reply = reply
    this.#options = options
    reply.raw.once('close', () => this.#onClose())
  }

  /** onError: remember the first error; any error makes the default commitOn roll back. */
  error(error: unknown): void {
    if (this.#error) return
    this.#error = {
      value:
        error ?? new Error(`${String(error)} was thrown (a non-Error value) in ${this.open.name}`),
    }
  }

  /** onTimeout: the socket timed out (connectionTimeout); the coming 'close' is a timeout. */
  timedOut(): void {
    this.#timedOut = true
  }

  handlerStarted(): void {
    this.#handler = 'running'
  }

  /** The route handler returned, threw, or its promise settled. */
  handlerSettled(): void {
    this.#handler = 'settled'
    if (this.#ending) return
    if (this.#deferred || this.#closed) void this.#finishQuietly(this.#afterClose())
    // Otherwise the reply is on its way: onSend (or, for a hijacked reply, 'close') ends it.
  }

  /**
   * onSend: decide, and for a plain payload end the unit of work before the
   * response is written. May run twice (an error in a later onSend hook, or our
   * own failed commit, sends an error response through it again).
   */
  send(payload: unknown, done: (error: Error | null, payload?: unknown) => void): void {
    const reply = this.#reply
    if (this.#responded) {
      // A second pass: the error response of our failed commit or of a later onSend hook,
      // or a racing one (a hook sent without `return reply`, so the handler ran too). It
      // waits for the first pass's response, so it can never overtake a committed one.
      const pass = () => {
        if (this.#commitFailed && reply.statusCode < 500) reply.code(500)
        this.#deliver(done, null, payload)
      }
      if (this.#firstPass) void this.#firstPass.then(pass)
      else pass()
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
      commit = this.#decide(response ? response.status : reply.statusCode)
    } catch (error) {
      this.#finish(false).then(() => this.#deliver(done, error as Error))
      return
    }
    if (response?.body != null && response.status !== 204 && response.status !== 304) {
      const body = scopedWebStream(response.body, this.#bodyEnd(commit))
      const { status, statusText, headers } = response
      done(null, new Response(body, { status, statusText, headers }))
      return
    }
    if (payload !== null && typeof payload === 'object') {
      if (typeof (payload as NodeJS.ReadableStream).pipe === 'function') {
        done(null, scopedStream(payload as NodeJS.ReadableStream, this.#bodyEnd(commit)))
        return
      }
      if (typeof (payload as ReadableStream).getReader === 'function') {
        done(null, scopedWebStream(payload as ReadableStream, this.#bodyEnd(commit)))
        return
      }
    }
    if (!commit && (timedOut || this.#handler === 'running')) {
      // A rollback answered while the chain still runs (handlerTimeout, or a reply sent
      // before the handler finished): the response goes out now, without waiting for the
      // running statement; the unit of work ends when the handler settles, never under it.
      this.#deferred = true
      if (this.#handler !== 'running') void this.#finishQuietly(false)
      done(null, payload)
      return
    }
    const status = reply.statusCode
    const contentType = reply.getHeader('content-type')
    this.#firstPass = this.#finish(commit).then((failure) => {
      if (failure !== undefined) {
        this.#deliver(done, commitError(this.open.name, failure))
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

  #onClose(): void {
    this.#closed = true
    const res = this.#reply.raw
    if (!res.writableEnded) {
      // The response was not ended: the client went away, or a timeout cut it off. (Ended
      // but not flushed means the app finished its response; that is not an abort.)
      const timeout = this.#timedOut || isRequestTimeout(this.#reply)
      this.open.abort(timeout ? 'timeout' : 'client-abort', {
        cancel: this.#options.cancelOnAbort,
        ...(timeout && { detail: 'the server timed the connection out' }),
      })
    }
    if (this.#ending || this.#handler === 'running') return
    void this.#finishQuietly(this.#afterClose())
  }

  /**
   * Commit at the end of a response that did not pass through onSend's decision:
   * only a hijacked reply that completed, and only if commitOn agrees.
   */
  #afterClose(): boolean {
    const res = this.#reply.raw
    if (this.#deferred || this.#responded || !this.#closed || !res.writableEnded) return false
    try {
      return this.#decide(res.statusCode)
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
    const answer = this.#options.commitOn({ status, error: this.#error?.value })
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
    return {
      enter: (fn) => this.open.enter(fn),
      end: () =>
        this.#finish(commit).then((failure) =>
          failure === undefined ? undefined : commitError(this.open.name, failure),
        ),
      fail: () => {
        void this.#finishQuietly(false)
      },
    }
  }

  /** End the unit of work, once. Resolves to what made a requested commit fail (undefined when nothing did). */
  #finish(commit: boolean): Promise<unknown> {
    this.#ending ??= this.open.end({ commit }).then(
      () => undefined,
      (error: unknown) => {
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
      },
    )
    return this.#ending
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

function isResponse(payload: unknown): payload is Response {
  return (
    payload !== null &&
    typeof payload === 'object' &&
    objectTag.call(payload) === '[object Response]'
  )
}

/** Node's `requestTimeout` ends the socket with ERR_HTTP_REQUEST_TIMEOUT (Fastify answers 408). */
function isRequestTimeout(reply: FastifyReply): boolean {
  const socket = reply.request.raw.socket as { errored?: { code?: unknown } | null } | null
  return socket?.errored?.code === 'ERR_HTTP_REQUEST_TIMEOUT'
}

/** The error that replaces a response whose unit of work could not be committed: always a 500. */
function commitError(name: string, cause: unknown): Error {
  const reason = cause instanceof Error ? cause.message : String(cause)
  const error = new TransactionStateError(
    `The unit of work of '${name}' was not committed, so its response was replaced by this error: ${reason}`,
    { cause },
  )
  return Object.assign(error, { statusCode: 500 })
}
