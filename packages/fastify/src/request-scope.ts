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
      // The second pass: the error response of a failed commit must not claim success.
      if (this.#commitFailed && reply.statusCode < 500) reply.code(500)
      done(null, payload)
      return
    }
    this.#responded = true
    if (this.#ending) {
      done(null, payload)
      return
    }
    const response = isResponse(payload) ? payload : undefined
    let commit: boolean
    try {
      commit = this.#decide(response ? response.status : reply.statusCode)
    } catch (error) {
      this.#finish(false).then(() => done(error as Error))
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
    if (!commit && this.#handler === 'running') {
      // The response is an error while the handler still runs (handlerTimeout, or a
      // reply sent before the handler finished): let it go out now, and end the unit
      // of work when the handler settles; never release under a running handler.
      this.#deferred = true
      const error = this.#error?.value as { code?: unknown } | undefined
      if (error?.code === 'FST_ERR_HANDLER_TIMEOUT') {
        this.open.abort('timeout', {
          cancel: this.#options.cancelOnAbort,
          detail: 'handlerTimeout',
        })
      }
      done(null, payload)
      return
    }
    this.#finish(commit).then((failure) => {
      if (failure === undefined) done(null, payload)
      else done(commitError(this.open.name, failure))
    })
  }

  #onClose(): void {
    this.#closed = true
    const res = this.#reply.raw
    if (!res.writableFinished) {
      // The response did not complete: the client went away, or a timeout cut it off.
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
    if (this.#deferred || this.#responded || !this.#closed || !res.writableFinished) return false
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
