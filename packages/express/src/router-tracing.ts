/**
 * What Express itself tells us about a request: which errors were thrown or
 * passed to `next(err)`, and when each middleware and handler settled.
 *
 * A middleware cannot wrap the layers after it, and Express swallows a
 * handler's throw (sync or async) into `next(err)`, where the middleware
 * never sees it; an error handler that answers 400 would then look like a
 * clean 400 and commit. Express 5's router (`router` >= 2.3) publishes every
 * layer invocation on the `express.router.request` tracing channel of
 * `node:diagnostics_channel`, for exactly this kind of observer, so nothing
 * has to be monkey-patched and nobody has to remember to mount an
 * error-marking middleware: an error anywhere after `scopedSession()` (a
 * handler, a middleware, a body parser, a `router.param()` callback) reaches
 * the request's unit of work by itself.
 *
 * The channel also says when each invocation settled (its `end`, or its
 * returned promise's `asyncEnd`), which is how an aborted request knows its
 * handler is done and the connection may go back.
 */
import dc from 'node:diagnostics_channel'
import express from 'express'

/** The part of a request's unit of work that hears the router's events. */
export interface TracedUnit {
  /** The next unit on the same request (another scope's), if any. */
  readonly inner: TracedUnit | undefined
  /** The request and the response it is the unit of work of. */
  readonly req: object
  readonly res: object
  /**
   * True once nothing needs to find it through its socket any more: it is
   * under its own `res` too, or its response ended and its scope ended.
   */
  readonly leftSocket: boolean
  /** An invocation (middleware, handler, error handler) after the unit's middleware began. */
  started(ctx: object): void
  /** That invocation returned, or its promise settled. */
  settled(ctx: object): void
  /** An error was thrown, rejected or passed to `next(err)`, or reached an error handler. */
  failed(error: unknown): void
}

interface TraceContext {
  req?: object
  res?: object
  error?: unknown
  incomingError?: unknown
  errorHandler?: boolean
  result?: unknown
}

/**
 * The first unit of work of a request (the others hang off its `inner`), kept
 * under this symbol on the response's socket when it is free, else in `elsewhere`.
 *
 * Why the socket: Express swaps the prototype of every request and response,
 * and on Node 20 (V8 11) that gives each of them a hidden class of its own, so
 * every property read of a request or response is an inline-cache miss (a
 * lookup in the runtime, through the whole prototype chain when the property
 * is absent), and a property added to one makes a hidden class for that one
 * object (a map and its descriptors, ~1.5 KB). A socket's hidden class is
 * shared: reading it is a cache hit, and on a keep-alive connection the
 * property is there from its first request on. The socket holds one unit at a
 * time, and one of a response that is still being answered is never displaced:
 * a pipelined response waiting for the socket, a second stream of a shared
 * socket, a unit whose application listens to its events (found after its
 * socket moved on), or a request Express did not set up, keep theirs in
 * `elsewhere`. A WeakMap lookup of an object that was never put in one is a
 * check of its hash field, no property read, so the usual request pays nothing
 * for it; only those few pay for an entry.
 */
const kUnit = Symbol('@scoped/express unit')
const elsewhere = new WeakMap<object, TracedUnit>()
/**
 * Nothing was ever put in `elsewhere`: a lookup there would miss, so it is skipped (the
 * usual process, whose units all sit on their sockets, never looks). Once set, it stays.
 */
let elsewhereEmpty = true

interface Hooked {
  [kUnit]?: TracedUnit
}

/** The first unit of work on `res` (or `req`, for a request Express did not set up). */
export function unitOf<U extends TracedUnit>(res: object | null | undefined): U | undefined {
  if (res == null) return undefined
  const socket = (res as { socket?: Hooked | null }).socket
  if (socket != null) {
    const u = socket[kUnit]
    if (u !== undefined && u.res === res) return u as U
  }
  return elsewhereEmpty ? undefined : (elsewhere.get(res) as U | undefined)
}

/**
 * The first unit of work of `req` (the request of an Express response). Through
 * its socket first, as unitOf() does for a response: `req.socket` stays set after
 * the response let go of its socket, and Node has usually just read it (a cache
 * hit), where `req.res` is read by nobody else (a miss on every request's own
 * hidden class, see above).
 */
export function unitOfRequest<U extends TracedUnit>(req: object): U | undefined {
  const socket = (req as { socket?: Hooked | null }).socket
  if (socket != null) {
    const u = socket[kUnit]
    if (u !== undefined && u.req === req) return u as U
  }
  return unitOf((req as { res?: object }).res)
}

/** The unit put under `target` itself by attachUnitTo() (not one found through a socket). */
export function unitAttachedTo<U extends TracedUnit>(target: object): U | undefined {
  return elsewhereEmpty ? undefined : (elsewhere.get(target) as U | undefined)
}

/** Make `unit` the first unit of its response: under its socket when that is free. */
export function attachUnit(unit: TracedUnit): void {
  const res = unit.res as { socket?: Hooked | null }
  const socket = res.socket
  if (socket != null) {
    const held = socket[kUnit]
    if (held === undefined || held.leftSocket) {
      socket[kUnit] = unit
      return
    }
  }
  attachUnitTo(res, unit)
}

/** Under `target` itself (`res` or `req`), to be found there whatever its socket holds. */
export function attachUnitTo(target: object, unit: TracedUnit): void {
  elsewhereEmpty = false
  elsewhere.set(target, unit)
}

/**
 * The units of the invocation's request: through its response, or, once the
 * response let go of its socket (a timeout answered by a listener registered
 * before the middleware), through the request, which keeps it.
 */
function unitsOf(ctx: TraceContext): TracedUnit | undefined {
  const u = unitOf(ctx.res)
  if (u !== undefined || ctx.req === undefined) return u
  return unitOfRequest(ctx.req)
}

function settled(ctx: TraceContext): void {
  for (let u = unitsOf(ctx); u !== undefined; u = u.inner) u.settled(ctx)
}

/** Node subscribes the events present only: `asyncStart` is left out on purpose (below). */
const subscribers = {
  start(message: unknown) {
    const ctx = message as TraceContext
    const first = unitOf(ctx.res)
    if (first === undefined) return
    // Errors raised before any traced invocation (route matching, URI decoding) are
    // never published on `error`, but every error handler sees them as incomingError.
    const incoming = ctx.errorHandler ? ctx.incomingError : undefined
    for (let u: TracedUnit | undefined = first; u !== undefined; u = u.inner) {
      if (incoming) u.failed(incoming)
      u.started(ctx)
    }
  },
  end(message: unknown) {
    const ctx = message as TraceContext
    // `result` or `error` set at `end`: it settled synchronously, no asyncEnd follows.
    if ('result' in ctx) {
      settled(ctx)
      return
    }
    if (!('error' in ctx)) return
    // A synchronous throw of a falsy value (`throw undefined`): the router forwards it as a
    // plain next() and publishes no `error`, but it was thrown, and must roll back.
    if (!ctx.error) {
      for (let u = unitOf(ctx.res); u !== undefined; u = u.inner) u.failed(ctx.error)
    }
    settled(ctx)
  },
  // No asyncStart: a subscriber there would make the router wrap every promise's end in
  // that channel's runStores (a closure and an iterator more per async invocation).
  asyncEnd(message: unknown) {
    settled(message as TraceContext)
  },
  error(message: unknown) {
    const ctx = message as TraceContext
    for (let u = unitOf(ctx.res); u !== undefined; u = u.inner) u.failed(ctx.error)
  },
}

/** @types/node asks for all five; Node itself takes any of them. */
type AllSubscribers = dc.TracingChannelSubscribers<object>

let ready = false

/**
 * Subscribe once per process, and check that this Express's router publishes
 * (router < 2.3 does not): without it a thrown error would commit, so refuse
 * to start rather than be quietly wrong.
 */
export function ensureRouterTracing(): void {
  if (ready) return
  const tracing = (dc as { tracingChannel?: typeof dc.tracingChannel }).tracingChannel
  if (typeof tracing !== 'function') {
    throw new Error(
      'scopedSession(): this Node.js has no diagnostics_channel.tracingChannel, which ' +
        '@scoped/express needs to see errors thrown in Express handlers. Use Node.js >= 20.',
    )
  }
  tracing('express.router.request').subscribe(subscribers as AllSubscribers)
  // A dry run through a router of the Express we were built against.
  let seen = false
  const res = {}
  const req = { url: '/', method: 'GET' }
  const probe: TracedUnit = {
    inner: undefined,
    req,
    res,
    leftSocket: true,
    started: () => {
      seen = true
    },
    settled: () => {},
    failed: () => {},
  }
  const wasEmpty = elsewhereEmpty
  attachUnit(probe)
  const router = express.Router()
  router.use((_req, _res, next) => next())
  // handle() is the router's entry point (what app.handle() calls); @types/express hides it.
  ;(router as unknown as { handle(req: object, res: object, done: () => void): void }).handle(
    req,
    res,
    () => {},
  )
  // The probe was the only entry: the usual process still never looks there.
  elsewhere.delete(res)
  elsewhereEmpty = wasEmpty
  if (!seen) {
    tracing('express.router.request').unsubscribe(subscribers as AllSubscribers)
    throw new Error(
      "scopedSession(): Express's router does not publish the 'express.router.request' " +
        'diagnostics channel (it was added in router 2.3.0), so a thrown error could not be ' +
        'told from a clean response and would be committed. Fix: update the router Express 5 ' +
        'uses (npm update router, or pnpm update router / yarn upgrade router).',
    )
  }
  ready = true
}
