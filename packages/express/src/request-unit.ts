/**
 * One request's unit of work, from `scopedSession()` to the last byte: who
 * may abort it, when it commits, and the backstop that ends it when nothing
 * else did.
 *
 *   running ──res.end()──▶ commit? ──yes──▶ end held ──COMMIT ok──▶ end sent
 *      │                     │                  └──COMMIT failed──▶ 500, or the socket cut
 *      │                     └──no (thrown error, 5xx, aborted)──▶ end sent, ROLLBACK
 *      └──'close' before res.end() (client gone, timeout): abort ──▶ ROLLBACK once the
 *                                                        handler settled
 *
 * Exactly one `open.end()` on every path: `#end()` makes it once.
 *
 * `AsyncLocalStorage` is lost in `req`/`res` event listeners, so nothing here
 * reaches the scope through `getSession()`: every callback holds the unit in
 * its closure. For the application's own listeners (a body reader's `'end'`,
 * a `'finish'` logger), `req.emit` and `res.emit` run inside the scope.
 */
import type { EventEmitter } from 'node:events'
import type { Socket } from 'node:net'
import { channels, type OpenScope, type Scope } from '@scoped/core'
import type { NextFunction, Request, Response } from 'express'
import type { ResolvedSessionOptions } from './options.js'
import { ResponseGate } from './response-gate.js'
import { RequestName } from './route-name.js'
import { attach, detach, type TracedUnit } from './router-tracing.js'

/** Run every listener of `emitter` inside the request's scope. */
function bindEmitter(emitter: EventEmitter, open: OpenScope<unknown>): void {
  const emit = emitter.emit
  emitter.emit = function emitInScope(this: EventEmitter, ...args: Parameters<typeof emit>) {
    return open.enter(() => emit.apply(this, args))
  } as typeof emit
}

function requestIdOf(req: Request): string | undefined {
  // pino-http and express-request-id set req.id; shown in holders and leak warnings.
  const id = (req as { id?: unknown }).id
  return typeof id === 'string' || typeof id === 'number' ? String(id) : undefined
}

export class RequestUnit implements TracedUnit {
  readonly scope: Scope<unknown>
  readonly open: OpenScope<unknown>
  #req: Request
  #res: Response
  #options: ResolvedSessionOptions
  #gate: ResponseGate | undefined
  #socket: Socket | undefined
  /** Router invocations (middleware, handlers) after ours that have not settled yet. */
  #inflight = new Set<object>()
  /** The first error thrown or passed to next(err) after the middleware. */
  #error: { value: unknown } | undefined
  #aborted = false
  #timedOut = false
  /** The response will not be ended by a handler any more (or was let through): end when settled. */
  #endWhenSettled = false
  #ending: Promise<unknown> | undefined

  constructor(scope: Scope<unknown>, req: Request, res: Response, options: ResolvedSessionOptions) {
    this.scope = scope
    this.#req = req
    this.#res = res
    this.#options = options
    const name = new RequestName(req, options.name, (e) =>
      this.#report(e, 'scopedSession({ name })'),
    )
    const requestId = requestIdOf(req)
    this.open = scope.open({
      name: name.provisional,
      kind: 'request',
      ...(requestId !== undefined && { requestId }),
    })
    // The route is known only after routing, and the session takes its name when it
    // is made (the first getSession(), usually in the handler): read the name lazily.
    Object.defineProperty(this.open, 'name', {
      get: () => name.current,
      configurable: true,
      enumerable: true,
    })
  }

  /** Hook the response and the socket, then run the rest of the chain inside the scope. */
  run(next: NextFunction): void {
    const req = this.#req
    const res = this.#res
    attach(req, this)
    bindEmitter(req, this.open)
    bindEmitter(res, this.open)
    this.#gate = new ResponseGate(res, () => this.#endRequested())
    // 'close' fires on every path: after a clean finish, on client aborts, on socket
    // timeouts, when an error handler destroys the socket. Before the end it means
    // nobody will receive a response.
    res.once('close', this.#onClose)
    const socket = req.socket as Socket | undefined
    if (socket) {
      this.#socket = socket
      // First in line: the unit of work is aborted before a res.setTimeout() callback
      // answers (say, 503), so that answer goes out at once and, with cancelOnAbort,
      // the slow statement is cancelled instead of holding the ROLLBACK back.
      socket.prependListener('timeout', this.#onSocketTimeout)
      socket.on('error', this.#onSocketError)
    }
    const closedAlready = res.closed
    this.open.enter(() => next())
    if (closedAlready) this.#onClose()
  }

  // ── router events (see router-tracing.ts) ──────────────────────────────

  started(ctx: object): void {
    if (this.#ending === undefined) this.#inflight.add(ctx)
  }

  settled(ctx: object): void {
    if (this.#inflight.delete(ctx) && this.#endWhenSettled) this.#settle()
  }

  failed(error: unknown): void {
    this.#error ??= { value: error }
  }

  // ── response and socket events ─────────────────────────────────────────

  /** The first `res.end()`, held by the gate. */
  #endRequested(): void {
    const gate = this.#gate!
    if (this.#ending !== undefined || this.#aborted) {
      // Aborted (client gone, timed out): nobody waits for a COMMIT. The handler may
      // still be running; the unit ends when it settled.
      gate.send()
      this.#endWhenSettled = true
      this.#settle()
      return
    }
    let commit: boolean
    try {
      commit =
        this.#options.commitOn({ status: this.#res.statusCode, error: this.#error?.value }) === true
    } catch (e) {
      // The response claims an outcome nobody could decide: do not send it as if committed.
      this.#report(e, 'scopedSession({ commitOn })')
      gate.fail()
      this.#end(false)
      return
    }
    if (!commit || this.open.existingSession === undefined) {
      // A rollback (or nothing to commit) is not waited for: what it undoes was never visible.
      gate.send()
      this.#end(commit)
      return
    }
    this.#end(true).then(
      () => gate.send(),
      (error) => {
        this.#report(
          error,
          this.#res.headersSent
            ? `COMMIT of '${this.#name()}' after its response began (the response was cut off)`
            : `COMMIT of '${this.#name()}' before its response (answered 500 instead)`,
        )
        gate.fail()
      },
    )
  }

  #onClose = (): void => {
    this.#unhookSocket()
    if (this.#gate?.endCalled) return // the end path owns the unit from here
    // No response will be sent: the client went away, a timeout destroyed the socket,
    // or Express's final handler cut a response that failed after it began. Roll back
    // once the handler has settled. The abort tells work still running to stop (and
    // cancels its statement with cancelOnAbort); a body parser's 'request aborted'
    // error usually arrives before this 'close', so an error alone does not skip it.
    const cutByServer = this.#error !== undefined && this.#res.headersSent && !this.#timedOut
    if (!cutByServer) this.#abort(this.#timedOut ? 'timeout' : 'client-abort')
    this.#endWhenSettled = true
    this.#settle()
  }

  #onSocketTimeout = (): void => {
    // server.timeout, res.setTimeout(), req.setTimeout(): the request ran out of time.
    // Node destroys the socket next unless someone listens on req/res/server.
    this.#timedOut = true
    this.#abort('timeout')
  }

  #onSocketError = (error: unknown): void => {
    // server.requestTimeout (the request did not arrive in time) destroys the socket with this.
    if ((error as { code?: unknown } | null)?.code === 'ERR_HTTP_REQUEST_TIMEOUT')
      this.#timedOut = true
  }

  // ── ending ─────────────────────────────────────────────────────────────

  #abort(kind: 'client-abort' | 'timeout'): void {
    // Once end() began, its outcome stands (the core ignores a later abort too): an
    // abort during COMMIT would only report a commit that did happen as failed.
    if (this.#ending !== undefined) return
    this.#aborted = true
    this.open.abort(kind, {
      cancel: this.#options.cancelOnAbort,
      ...(kind === 'timeout' && { detail: 'socket timeout' }),
    })
  }

  #settle(): void {
    if (this.#inflight.size === 0) this.#end(false)
  }

  /** End the unit of work, once. The first call decides COMMIT or ROLLBACK. */
  #end(commit: boolean): Promise<unknown> {
    if (this.#ending === undefined) {
      this.#inflight.clear()
      detach(this.#req, this)
      const ending = this.open.end({ commit })
      // A rollback has no one to report to but the scope's onError; a commit's caller reports.
      if (!commit) ending.catch((e) => this.#report(e, `ROLLBACK of '${this.#name()}'`))
      this.#ending = ending
    }
    return this.#ending
  }

  #unhookSocket(): void {
    const socket = this.#socket
    if (!socket) return
    this.#socket = undefined
    socket.removeListener('timeout', this.#onSocketTimeout)
    socket.removeListener('error', this.#onSocketError)
  }

  #name(): string {
    return this.open.existingSession?.name ?? this.open.name
  }

  #report(error: unknown, during: string): void {
    const session = this.open.existingSession
    if (channels.error.hasSubscribers) {
      channels.error.publish({ scope: this.scope.name, session, error, during })
    }
    const { onError, logger } = this.scope.options
    if (onError) onError(error, { during, session: this.#name() })
    else logger.error(`[scoped/express] ${during} failed (scope '${this.scope.name}'):`, error)
  }
}
