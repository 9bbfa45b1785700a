/**
 * One request's unit of work, from `scopedSession()` to the last byte: who
 * may abort it, when it commits, and the backstop that ends it when nothing
 * else did.
 *
 *   running ──res.end()──▶ commit? ──yes──▶ end held ──COMMIT ok──▶ end sent
 *      │                     │                  └──COMMIT failed──▶ 500, or the socket cut
 *      │                     └──no (thrown error, 5xx, aborted), or no session──▶ end sent,
 *      │                                                               ROLLBACK (or nothing)
 *      └──'close' before res.end() (client gone, timeout): abort ──▶ ROLLBACK once the
 *                                                        handler settled
 *
 * Exactly one `open.end()` (or `open.endNow()`) on every path: `#end()` makes it once.
 *
 * Cheap when the request never touches the database: no session means nothing
 * to commit, so its end goes straight through and the scope ends at once
 * (`endNow`, no promise). Nothing is made per request but the unit and its
 * scope: the hooks on `req`/`res` are shared functions that find the unit
 * (through the socket, see unitOf), the name is worked out only when read, a
 * response gate only when a write or a COMMIT needs one, a Set of running
 * handlers only when more than one runs at once.
 *
 * `AsyncLocalStorage` is lost in `req`/`res` event listeners, so nothing here
 * reaches the scope through `getSession()`: the hooks find the unit from `req`
 * and `res`. For the application's own listeners (a body reader's `'end'`,
 * a `'finish'` logger), `req.emit` and `res.emit` run them inside the scope;
 * the same hooks see `'close'` (the response is over, or will never be sent)
 * and `'timeout'` (a socket timeout, before any listener answers it).
 */
import type { EventEmitter } from 'node:events'
import http, { type ServerResponse } from 'node:http'
import { channels, type OpenOptions, type OpenScope, type Scope } from '@scoped/core'
import express, { type NextFunction, type Request, type Response } from 'express'
import { defaultCommitOn, type ResolvedSessionOptions } from './options.js'
import { type Args, type End, ResponseGate, type Write } from './response-gate.js'
import { RequestName } from './route-name.js'
import {
  attachUnit,
  attachUnitTo,
  type TracedUnit,
  unitAttachedTo,
  unitOf,
  unitOfRequest,
} from './router-tracing.js'

type Emit = EventEmitter['emit']

function requestIdOf(req: Request): string | undefined {
  // pino-http and express-request-id set req.id; shown in holders and leak warnings.
  // Read only when there is one: a request's hidden class is its own (see unitOf), so
  // reading an absent property is a lookup through its whole prototype chain in the
  // runtime, while these checks hit caches (its prototype is the app's, every time).
  if (!Object.hasOwn(req, 'id')) {
    const proto = Object.getPrototypeOf(req) as object | null
    if (proto === null || !('id' in proto)) return undefined
  }
  const id = (req as { id?: unknown }).id
  return typeof id === 'string' || typeof id === 'number' ? String(id) : undefined
}

// Node's methods, under Express's request and response prototypes.
const nodeRes = http.ServerResponse.prototype
const nodeReq = http.IncomingMessage.prototype

/**
 * The hooks of a request's first unit, once per process on the prototypes
 * every Express app's requests and responses inherit from (`express.request`,
 * `express.response`, Express's place for extensions): a request then costs
 * no method of its own (objects whose methods are their own are slower
 * everywhere Node calls them), and its unit is found by unitOf().
 * A response with no unit goes straight to Node's method.
 */
let hooked = false
/** Once per process, when the first middleware is made: before any request reaches one. */
export function installHooks(): void {
  if (hooked) return
  hooked = true
  const request = express.request as object as Record<string, unknown>
  const response = express.response as object as Record<string, unknown>
  response.end = function end(this: ServerResponse, ...args: Args): ServerResponse {
    const unit = unitOf<RequestUnit>(this)
    return unit === undefined ? nodeRes.end.apply(this, args as never) : unit.resEnd(this, args)
  }
  response.write = function write(this: ServerResponse, ...args: Args): boolean {
    const unit = unitOf<RequestUnit>(this)
    return unit === undefined ? nodeRes.write.apply(this, args as never) : unit.resWrite(this, args)
  }
  // `arguments`, not a rest parameter: Node emits many events per request, and V8 passes
  // `arguments` on to apply() without making an array. It leaves the hook (and is made)
  // only for an event the application listens to.
  response.emit = function emit(this: EventEmitter, type: string | symbol): boolean {
    const unit = unitOf<RequestUnit>(this)
    if (unit !== undefined) {
      unit.resEvent(type)
      if (unit.listened && this.listenerCount(type) > 0) {
        // biome-ignore lint/complexity/noArguments: see above
        return unit.emitInScope(this, nodeRes.emit, arguments)
      }
    }
    // biome-ignore lint/complexity/noArguments: see above
    return nodeRes.emit.apply(this, arguments as never)
  }
  request.emit = function emit(this: EventEmitter, type: string | symbol): boolean {
    const unit = unitOfRequest<RequestUnit>(this)
    if (unit !== undefined) {
      if (type === 'timeout') unit.timedOut()
      else if (type === 'close') unit.requestClosed()
      if (unit.listened && this.listenerCount(type) > 0) {
        // biome-ignore lint/complexity/noArguments: see above
        return unit.emitInScope(this, nodeReq.emit, arguments)
      }
    }
    // biome-ignore lint/complexity/noArguments: see above
    return nodeReq.emit.apply(this, arguments as never)
  }
  // A listener added before the response ends is the application's (Node's own are added
  // before the middleware, or after the end): from then on the request's events run
  // inside the scope. Until then they
  // need not, which spares a context switch per event of a request with no listener of
  // its own (Node 24 makes a new context frame for each).
  for (const method of ['on', 'addListener', 'prependListener', 'once', 'prependOnceListener']) {
    const ofRes = (nodeRes as unknown as Record<string, (...a: unknown[]) => unknown>)[method]!
    const ofReq = (nodeReq as unknown as Record<string, (...a: unknown[]) => unknown>)[method]!
    response[method] = function listen(this: EventEmitter) {
      const unit = unitOf<RequestUnit>(this)
      if (unit !== undefined) unit.listenerAdded()
      // biome-ignore lint/complexity/noArguments: as emit
      return ofRes.apply(this, arguments as never)
    }
    request[method] = function listen(this: EventEmitter) {
      const unit = unitOfRequest<RequestUnit>(this)
      if (unit !== undefined) unit.listenerAdded()
      // biome-ignore lint/complexity/noArguments: as emit
      return ofReq.apply(this, arguments as never)
    }
  }
}

export class RequestUnit implements TracedUnit {
  readonly scope: Scope<unknown>
  readonly open: OpenScope<unknown>
  /** Another scope's unit on the same request, mounted after this one. */
  inner: RequestUnit | undefined
  /** The request it is the unit of work of. */
  readonly req: Request
  readonly res: Response
  #options: ResolvedSessionOptions
  /** The mount path when the middleware ran (the provisional name's), and the name once asked. */
  #base: string
  #name: RequestName | undefined
  // What req/res had before our hooks (Node's, or an earlier middleware's).
  #end0: End
  #write0: Write
  #gate: ResponseGate | undefined
  /** Hooked through Express's prototypes (see installHooks), not by methods of its own. */
  #viaPrototype: boolean
  /**
   * A listener was added to req or res after the middleware (or the unit cannot tell:
   * hooked by methods of its own): events run inside the scope.
   */
  listened = false

  /** `req.on()`, `res.once()`, …: see installHooks. */
  listenerAdded(): void {
    if (this.listened || this.#endCalled) return
    this.listened = true
    // Its events may come after the socket moved on to the next request: found on `res` too.
    attachUnitTo(this.res, this)
  }

  /** See TracedUnit.leftSocket. */
  get leftSocket(): boolean {
    return this.listened || (this.#ended && this.#endCalled)
  }
  /** res.end() was called (held, or let through). */
  #endCalled = false
  /**
   * Router invocations (middleware, handlers) after ours that have not settled
   * yet: the usual one in a slot, a Set only when more run at once.
   */
  #running: object | undefined
  #inflight: Set<object> | undefined
  /** The first error thrown or passed to next(err) after the middleware. */
  #error: { value: unknown } | undefined
  #aborted = false
  #timedOut = false
  /** The response will not be ended by a handler any more (or was let through): end when settled. */
  #endWhenSettled = false
  /** `open.endNow()` / `open.end()` was called: the outcome is decided. */
  #ended = false

  /** `first`: the first unit already on the request (unitOf(res)), if any. */
  constructor(
    scope: Scope<unknown>,
    req: Request,
    res: Response,
    options: ResolvedSessionOptions,
    first: RequestUnit | undefined,
  ) {
    this.scope = scope
    this.req = req
    this.res = res
    this.#options = options
    this.#base = req.baseUrl ?? ''
    // The first unit of an Express request: the hooks on the prototypes find it on `res`, and
    // what it ends, writes and emits with is Node's (an earlier middleware's own res.end,
    // compression's say, calls through the prototype's, so it stays outside this one).
    // Otherwise (another scope's unit came first, or an app of another copy of Express)
    // it wraps whatever the request and response have now.
    this.#viaPrototype =
      first === undefined &&
      unitAttachedTo(req) === undefined &&
      Object.prototype.isPrototypeOf.call(express.response, res) &&
      Object.prototype.isPrototypeOf.call(express.request, req)
    this.listened = !this.#viaPrototype
    if (this.#viaPrototype) {
      this.#end0 = nodeRes.end as End
      this.#write0 = nodeRes.write as Write
    } else {
      this.#end0 = res.end as End
      this.#write0 = res.write as Write
    }
    // The route is known only after routing, and the session takes its name when it is
    // made (the first getSession(), usually in the handler): the name is read lazily.
    const opts: OpenOptions = { name: () => this.#currentName(), kind: 'request' }
    const requestId = requestIdOf(req)
    if (requestId !== undefined) opts.requestId = requestId
    this.open = scope.open(opts)
  }

  /** Hook the request and the response, then run the rest of the chain inside the scope. */
  run(next: NextFunction, first: RequestUnit | undefined): void {
    const req = this.req
    const res = this.res
    if (this.#viaPrototype) {
      attachUnit(this)
    } else {
      if (first === undefined) {
        // Not an Express request of ours: the unit is found by req and res all the same.
        attachUnitTo(res, this)
        attachUnitTo(req, this)
      } else {
        // Another scope's unit is there: this one wraps whatever its hooks are now.
        let last = first
        while (last.inner !== undefined) last = last.inner
        last.inner = this
      }
      const unit = this
      res.end = function end(this: ServerResponse, ...args: Args) {
        return unit.resEnd(this, args)
      } as Response['end']
      res.write = function write(this: ServerResponse, ...args: Args) {
        return unit.resWrite(this, args)
      } as Response['write']
      const resEmit0 = res.emit
      const reqEmit0 = req.emit
      res.emit = function emit(this: EventEmitter, ...args: [string | symbol, ...unknown[]]) {
        unit.resEvent(args[0])
        return unit.emitInScope(this, resEmit0, args)
      } as Emit
      req.emit = function emit(this: EventEmitter, ...args: [string | symbol, ...unknown[]]) {
        if (args[0] === 'timeout') unit.timedOut()
        else if (args[0] === 'close') unit.requestClosed()
        return unit.emitInScope(this, reqEmit0, args)
      } as Emit
    }
    // `res.closed` is an inherited getter (a lookup through the chain, see unitOf); a
    // response is closed only once its socket is destroyed or gone, so it is read then
    // (or when the socket cannot say: not a net.Socket).
    const socket = res.socket as { destroyed?: unknown } | null | undefined
    const closedAlready = socket == null || socket.destroyed !== false ? res.closed : false
    this.open.enter(next)
    if (closedAlready) this.#onClose()
  }

  // ── router events (see router-tracing.ts) ──────────────────────────────

  started(ctx: object): void {
    if (this.#ended) return
    if (this.#running === undefined && this.#inflight === undefined) {
      this.#running = ctx
      return
    }
    this.#inflight ??= new Set()
    if (this.#running !== undefined) {
      this.#inflight.add(this.#running)
      this.#running = undefined
    }
    this.#inflight.add(ctx)
  }

  settled(ctx: object): void {
    let was: boolean
    if (this.#running === ctx) {
      this.#running = undefined
      was = true
    } else {
      was = this.#inflight?.delete(ctx) ?? false
    }
    if (was && this.#endWhenSettled) this.#settle()
  }

  failed(error: unknown): void {
    this.#error ??= { value: error }
  }

  // ── the hooks on req and res ───────────────────────────────────────────

  /** `res.end()`: the first one decides; a held one waits for the COMMIT. */
  resEnd(res: ServerResponse, args: Args): ServerResponse {
    if (this.#endCalled) {
      return this.#gate ? this.#gate.endAgain(res, args) : this.#end0.apply(res, args)
    }
    this.#endCalled = true
    if (this.#ended || this.#aborted || this.#gone(res)) {
      // Aborted (client gone, timed out), or the response destroyed: nobody waits for a
      // COMMIT. The handler may still be running; the unit ends (rolled back) when it settled.
      if (this.#aborted && !this.#ended && !this.#gone(res) && this.#claimsCommit(res)) {
        // A timeout aborted the unit of work, but a callback let the request go on, and its
        // response claims the work was done: the client must not read that for a rollback.
        this.#report(
          this.open.aborted,
          `the ${res.statusCode} response of '${this.#sessionName()}' (its unit of work was aborted and rolled back; answered 500 instead)`,
        )
        const gate = this.#gateOf()
        gate.hold(args)
        gate.fail(res)
      } else {
        this.#letThrough(res, args)
      }
      this.#endWhenSettled = true
      this.#settle()
      return res
    }
    let commit: boolean
    try {
      commit = this.#commitOn(res)
    } catch (e) {
      // The response claims an outcome nobody could decide: do not send it as if committed.
      this.#report(e, 'scopedSession({ commitOn })')
      const gate = this.#gateOf()
      gate.hold(args)
      gate.fail(res)
      this.#end(false)
      return res
    }
    if (!commit || this.open.existingSession === undefined) {
      // A rollback (or nothing to commit) is not waited for: what it undoes was never visible.
      this.#letThrough(res, args)
      this.#end(commit)
      return res
    }
    this.#ended = true
    this.#running = undefined
    this.#inflight = undefined
    let now: boolean
    try {
      // Nothing to COMMIT after all (no statement ran, or autocommit ones only): sent now.
      now = this.open.endNow(true)
    } catch (e) {
      this.#commitFailed(res, args, e)
      return res
    }
    if (now) {
      this.#letThrough(res, args)
      return res
    }
    const gate = this.#gateOf()
    gate.hold(args)
    gate.freeze(res)
    this.open.end({ commit: true }).then(
      () => gate.send(res),
      (error) => this.#commitFailed(res, args, error),
    )
    return res
  }

  /**
   * Does this response, of a unit of work an abort rolls back, claim that work was done?
   * Only with an open transaction whose work the ROLLBACK undoes (not when no statement
   * ran, or only autocommitted ones, `transaction: 'none'`), and only a success (2xx,
   * 3xx: a timeout callback's 408 or 503 claims nothing) that commitOn would have
   * committed (a 202 the application does not commit claims nothing either). A commitOn
   * that throws here is reported, and its response counts as claiming.
   */
  #claimsCommit(res: ServerResponse): boolean {
    if (res.statusCode >= 400 || this.open.existingSession?.inTransaction !== true) return false
    try {
      return this.#commitOn(res)
    } catch (e) {
      this.#report(e, 'scopedSession({ commitOn })')
      return true
    }
  }

  /** commitOn's answer for this response (the default without making its argument); throws what it throws. */
  #commitOn(res: ServerResponse): boolean {
    const commitOn = this.#options.commitOn
    if (commitOn === defaultCommitOn) return this.#error === undefined && res.statusCode < 500
    return answered(commitOn({ status: res.statusCode, error: this.#error?.value }))
  }

  /**
   * The response can never be sent, though no 'close' said so yet: destroyed in
   * this turn (Node emits 'close' a turn later), or a pipelined response still
   * waiting for a socket its client already closed (it gets no 'close' at all).
   */
  #gone(res: ServerResponse): boolean {
    return res.destroyed || (this.req.socket as { destroyed?: boolean } | null)?.destroyed === true
  }

  #commitFailed(res: ServerResponse, args: Args, error: unknown): void {
    this.#report(
      error,
      res.headersSent
        ? `COMMIT of '${this.#sessionName()}' after its response began (the response was cut off)`
        : `COMMIT of '${this.#sessionName()}' before its response (answered 500 instead)`,
    )
    const gate = this.#gateOf()
    gate.hold(args) // no-op when it holds the end already
    gate.fail(res)
  }

  /** `res.write()`: through at once, but for the write that completes a Content-Length. */
  resWrite(res: ServerResponse, args: Args): boolean {
    if (this.#endCalled && this.#gate === undefined) return this.#write0.apply(res, args)
    return this.#gateOf().write(res, args)
  }

  /** An event of the response, before its listeners run. */
  resEvent(type: string | symbol): void {
    if (type === 'close') this.#onClose()
    else if (type === 'timeout') this.#onTimeout()
  }

  /** A socket timeout, seen on the request. */
  timedOut(): void {
    this.#onTimeout()
  }

  /**
   * The request closed. With its socket destroyed, the client is gone: a
   * pipelined response still queued behind an earlier one never gets a 'close'
   * of its own (Node emits it on the request only), so this is its abort.
   */
  requestClosed(): void {
    if (this.req.socket?.destroyed === true) this.#onClose()
  }

  /**
   * `emit` (what the target had before our hook) with `args`, the event's name
   * first: inside the scope when the application listens to it.
   */
  emitInScope(target: EventEmitter, emit: Emit, args: ArrayLike<unknown>): boolean {
    // No listener of the application's, nothing to run in the scope ('error' without
    // one throws as it would).
    if (!this.listened || target.listenerCount(args[0] as string | symbol) === 0) {
      return emit.apply(target, args as never)
    }
    return this.open.enter(() => emit.apply(target, args as never))
  }

  #gateOf(): ResponseGate {
    this.#gate ??= new ResponseGate(this.#end0, this.#write0)
    return this.#gate
  }

  /** The end goes out now (with any write the gate holds). */
  #letThrough(res: ServerResponse, args: Args): void {
    const gate = this.#gate
    if (gate === undefined) {
      this.#end0.apply(res, args)
      return
    }
    gate.hold(args)
    gate.send(res)
  }

  // ── response and socket events ─────────────────────────────────────────

  #onClose(): void {
    if (this.#endCalled) return // the end path owns the unit from here
    if (this.#ended) return
    // server.requestTimeout (the request did not arrive in time) destroys the socket with this.
    const socketError = (this.req.socket as { errored?: { code?: unknown } | null } | undefined)
      ?.errored
    if (socketError?.code === 'ERR_HTTP_REQUEST_TIMEOUT') this.#timedOut = true
    // No response will be sent: the client went away, a timeout destroyed the socket,
    // or Express's final handler cut a response that failed after it began. Roll back
    // once the handler has settled. The abort tells work still running to stop (and
    // cancels its statement with cancelOnAbort); a body parser's 'request aborted'
    // error usually arrives before this 'close', so an error alone does not skip it.
    const cutByServer = this.#error !== undefined && this.res.headersSent && !this.#timedOut
    if (!cutByServer) this.#abort(this.#timedOut ? 'timeout' : 'client-abort')
    this.#endWhenSettled = true
    this.#settle()
  }

  #onTimeout(): void {
    // server.timeout, res.setTimeout(), req.setTimeout(): the request ran out of time.
    // Seen before any 'timeout' listener runs: the unit of work is aborted before a
    // res.setTimeout() callback answers (say, 503), so that answer goes out at once and,
    // with cancelOnAbort, the slow statement is cancelled instead of holding the
    // ROLLBACK back. Node destroys the socket next unless someone listens.
    this.#timedOut = true
    this.#abort('timeout')
  }

  // ── ending ─────────────────────────────────────────────────────────────

  #abort(kind: 'client-abort' | 'timeout'): void {
    // Once end() began, its outcome stands (the core ignores a later abort too): an
    // abort during COMMIT would only report a commit that did happen as failed.
    if (this.#ended) return
    this.#aborted = true
    this.open.abort(kind, {
      cancel: this.#options.cancelOnAbort,
      ...(kind === 'timeout' && { detail: 'socket timeout' }),
    })
  }

  #settle(): void {
    if (
      this.#running === undefined &&
      (this.#inflight === undefined || this.#inflight.size === 0)
    ) {
      this.#end(false)
    }
  }

  /** End the unit of work, once. The first call decides COMMIT or ROLLBACK. */
  #end(commit: boolean): void {
    if (this.#ended) return
    this.#ended = true
    this.#running = undefined
    this.#inflight = undefined
    try {
      // Nothing to wait for (no session, or nothing to end but a connection): ended now.
      if (this.open.endNow(commit)) return
    } catch (e) {
      this.#report(e, this.#during(commit))
      return
    }
    // No one to report to but the scope's onError: the response went out already.
    this.open.end({ commit }).catch((e) => this.#report(e, this.#during(commit)))
  }

  // ── names and reports ──────────────────────────────────────────────────

  #currentName(): string {
    this.#name ??= new RequestName(this.req, this.#options.name, this.#base, (e) =>
      this.#report(e, 'scopedSession({ name })'),
    )
    return this.#name.current
  }

  #during(commit: boolean): string {
    return `${commit ? 'COMMIT' : 'ROLLBACK'} of '${this.#sessionName()}'`
  }

  #sessionName(): string {
    return this.open.existingSession?.name ?? this.open.name
  }

  #report(error: unknown, during: string): void {
    const session = this.open.existingSession
    if (channels.error.hasSubscribers) {
      channels.error.publish({ scope: this.scope.name, session, error, during })
    }
    const { onError, logger } = this.scope.options
    if (onError) onError(error, { during, session: this.#sessionName() })
    else logger.error(`[scoped/express] ${during} failed (scope '${this.scope.name}'):`, error)
  }
}

/**
 * A custom `commitOn`'s answer, which must be true or false: anything else (an
 * async function's Promise, a forgotten `return`) would quietly roll back work
 * behind a 2xx. It throws instead (answered 500, rolled back, reported).
 */
function answered(answer: unknown): boolean {
  if (typeof answer === 'boolean') return answer
  const thenable = typeof (answer as { then?: unknown } | null)?.then === 'function'
  throw new TypeError(
    `scopedSession(scope, { commitOn }): commitOn must return true or false, got ${
      thenable
        ? 'a Promise (it cannot be async: it decides before the response is sent)'
        : answer === null
          ? 'null'
          : typeof answer
    }`,
  )
}
