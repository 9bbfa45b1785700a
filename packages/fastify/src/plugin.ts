/**
 * `scopedSession`: the Fastify plugin. Every request gets its own scope, so
 * `getSession()` anywhere in its chain (content-type parsers, hooks, the
 * handler, the error handler, and everything they start) returns the
 * request's session; the unit of work commits before the response is
 * written, and its connection is released exactly once on every path.
 */
import type { DefaultConnection, OpenScope, Session } from '@scoped/core'
import { NoActiveScopeError, ScopeClosedError } from '@scoped/core'
import type {
  FastifyInstance,
  FastifyPluginCallback,
  FastifyReply,
  FastifyRequest,
  RouteHandlerMethod,
  RouteOptions,
} from 'fastify'
import fp from 'fastify-plugin'
import { type ResolvedOptions, resolveOptions, type ScopedSessionOptions } from './options.js'
import { RequestScope, watchTimeout } from './request-scope.js'

declare module 'fastify' {
  interface FastifyRequest {
    /**
     * This request's database session (`getSession()` of the request's scope),
     * made on first use; it checks a connection out on its first statement.
     * Works outside AsyncLocalStorage too (in `req`/`res` listeners).
     */
    readonly session: Session<DefaultConnection>
  }
}

/** The scopes registered on each Fastify instance (a child context inherits its parents'). */
const registered = new WeakMap<object, Set<unknown>>()

function registeredIn(fastify: FastifyInstance, scope: unknown): boolean {
  for (let f: object | null = fastify; f !== null; f = Object.getPrototypeOf(f)) {
    if (registered.get(f)?.has(scope)) return true
  }
  return false
}

/** Marks the config of routes whose handler the plugin tracks (a bound handler loses any mark). */
const kTracked = Symbol('scoped.tracked')

/**
 * The request's RequestScope of one registration: each registration (one per
 * scope, e.g. two databases) has its own decorated slot, so request objects
 * keep one shape and two scopes each get their own session.
 */
function scopeOf(request: FastifyRequest, slot: symbol): RequestScope | null | undefined {
  return (request as unknown as Record<symbol, RequestScope | null | undefined>)[slot]
}

/**
 * The call `tracked` makes inside the request's scope, passed through these
 * slots instead of a closure (one closure per request is ~100 B on Node 20):
 * `enter` calls its function synchronously, and the slots are cleared before
 * the handler runs, so a handler that calls another route's handler (inject)
 * cannot see them.
 */
let slotHandler: RouteHandlerMethod | undefined
let slotThis: FastifyInstance | undefined
let slotRequest: FastifyRequest | undefined
let slotReply: FastifyReply | undefined

function callSlot(): unknown {
  const handler = slotHandler!
  const self = slotThis
  const request = slotRequest!
  const reply = slotReply!
  slotHandler = slotThis = slotRequest = slotReply = undefined
  return handler.call(self as FastifyInstance, request, reply)
}

/**
 * Wrap a route handler so that it runs inside the request's scope and the
 * request knows when it runs: after a client abort the connection is released
 * only once the handler settled. Nothing is attached to the handler's promise
 * here (a request that never needs to know costs no reaction); the request
 * watches it only when an abort or a rollback asks whether it still runs.
 *
 * Entering the scope costs next to nothing when the chain is already in it
 * (AsyncLocalStorage.run returns at once for the current store), and puts the
 * handler back in it when a callback-style hook called `done` from another
 * async context.
 */
function trackHandler(handler: RouteHandlerMethod, slot: symbol): RouteHandlerMethod {
  return function tracked(this: FastifyInstance, request, reply) {
    const scope = scopeOf(request, slot)
    if (!scope) return handler.call(this, request, reply)
    scope.handlerStarted()
    let result: unknown
    slotHandler = handler
    slotThis = this
    slotRequest = request
    slotReply = reply
    try {
      result = scope.open.enter(callSlot)
    } catch (error) {
      // Recorded here too: a hijacked reply gets no onError from Fastify.
      scope.error(error)
      scope.handlerSettled()
      throw error
    }
    scope.handlerReturned(result)
    return result
  } as RouteHandlerMethod
}

/**
 * The methods Fastify never parses a body for (its `bodyless` set; every
 * other method may have one, custom methods included).
 */
const bodyless = new Set(['GET', 'HEAD', 'TRACE'])

/** Does the route take a method whose body Fastify may parse? */
function takesBody(method: RouteOptions['method']): boolean {
  if (typeof method === 'string') return !bodyless.has(method.toUpperCase())
  if (Array.isArray(method)) return method.some((m) => !bodyless.has(String(m).toUpperCase()))
  return true
}

/** `hook` first, then what the route declared (a function, an array, or nothing). */
function prependHook(existing: unknown, hook: unknown): unknown[] {
  if (existing === undefined) return [hook]
  return Array.isArray(existing) ? [hook, ...existing] : [hook, existing]
}

/**
 * Can this request have a body (so a content-type parser may read it from
 * `req` events)? Without Content-Type, Transfer-Encoding or a non-zero
 * Content-Length, an HTTP/1 request has none, and Fastify parses nothing.
 */
function mayHaveBody(request: FastifyRequest): boolean {
  const raw = request.raw
  if (raw.httpVersionMajor !== 1) return true
  const headers = raw.headers
  const length = headers['content-length']
  return (
    headers['content-type'] !== undefined ||
    headers['transfer-encoding'] !== undefined ||
    (length !== undefined && length !== '0')
  )
}

/** `req` events (body chunks, end, errors) run outside AsyncLocalStorage; run them inside the request's scope. */
function bindRequestEvents(request: FastifyRequest, open: OpenScope<unknown>): void {
  const raw = request.raw as { emit: (...args: unknown[]) => boolean }
  const emit = raw.emit
  raw.emit = function scopedEmit(this: unknown, ...args: unknown[]) {
    return open.enter(() => emit.apply(this, args))
  }
}

function scopedSessionPlugin(
  fastify: FastifyInstance,
  options: ScopedSessionOptions,
  done: (error?: Error) => void,
): void {
  let opts: ResolvedOptions
  try {
    opts = resolveOptions(options)
    if (registeredIn(fastify, opts.scope)) {
      throw new TypeError(
        `app.register(scopedSession): already registered for scope '${opts.scope.name}' in this ` +
          'app (or a parent context): a second registration would give each request two ' +
          'sessions of one scope, committed separately. Register it once, at the root.',
      )
    }
    if (opts.decorate && fastify.hasRequestDecorator('session')) {
      throw new TypeError(
        'app.register(scopedSession): request.session is already decorated by another plugin ' +
          '(e.g. @fastify/session). Pass { decorate: false } and use getSession() instead.',
      )
    }
  } catch (error) {
    done(error as Error)
    return
  }
  const { scope } = opts
  let warnedUntracked = false
  const kScope = Symbol(`scoped.request(${scope.name})`)
  const scopes = registered.get(fastify) ?? new Set()
  registered.set(fastify, scopes)
  scopes.add(scope)

  fastify.decorateRequest(kScope, null)
  if (opts.decorate) {
    fastify.decorateRequest('session', {
      getter(this: FastifyRequest) {
        const state = scopeOf(this, kScope)
        if (!state) throw new NoActiveScopeError(scope.name, 'request.session')
        return state.open.session as Session<DefaultConnection>
      },
    })
  }

  // The body was read in req listeners, and a parser or a hook may have called back from
  // another context: resume the rest of the chain inside the scope. A route-level hook, on
  // routes that take a body only: a Fastify hook costs every request it runs for, and on
  // GET/HEAD/TRACE Fastify parses nothing (their handler re-enters the scope on its own).
  function reenter(request: FastifyRequest, _reply: FastifyReply, next: () => void): void {
    const state = scopeOf(request, kScope)
    if (state) state.open.enter(next)
    else next()
  }

  fastify.addHook('onRoute', (route: RouteOptions) => {
    // A handler that is not a function is left to Fastify, which rejects it at boot.
    if (typeof route.handler !== 'function') return
    route.handler = trackHandler(route.handler, kScope)
    route.config = { ...route.config, [kTracked]: true }
    if (takesBody(route.method)) {
      route.preValidation = prependHook(
        route.preValidation,
        reenter,
      ) as RouteOptions['preValidation']
    }
  })

  fastify.addHook('onRequest', (request: FastifyRequest, reply: FastifyReply, next) => {
    let state: RequestScope
    try {
      state = new RequestScope(request, reply, opts)
    } catch (error) {
      // A closing scope refuses new work: the request is answered 503, not 500.
      next(
        error instanceof ScopeClosedError
          ? Object.assign(error, { statusCode: 503 })
          : (error as Error),
      )
      return
    }
    ;(request as unknown as Record<symbol, RequestScope>)[kScope] = state
    // HTTP/1 only: an HTTP/2 request's socket is a proxy of its session's, and its
    // timeouts are the session's.
    if (request.raw.httpVersionMajor === 1) watchTimeout(request.raw.socket)
    if (mayHaveBody(request)) bindRequestEvents(request, state.open)
    state.open.enter(next)
  })

  // Runs right before the error handler: record the error, and run the handler inside the scope.
  fastify.addHook('onError', (request: FastifyRequest, _reply: FastifyReply, error, next) => {
    const state = scopeOf(request, kScope)
    if (!state) return next()
    state.error(error)
    state.open.enter(next)
  })

  fastify.addHook('onSend', (request: FastifyRequest, _reply: FastifyReply, payload, next) => {
    const state = scopeOf(request, kScope)
    if (!state) return next(null, payload)
    // A response whose handler never ran through our wrapper: a hook answered, a 404, or
    // a route declared before the plugin loaded, which is worth one warning.
    if (!warnedUntracked && !state.handlerRan) warnIfUntracked(request)
    state.send(payload, next as (error: Error | null, payload?: unknown) => void)
  })

  function warnIfUntracked(request: FastifyRequest): void {
    const route = request.routeOptions
    if (route.url === undefined || (route.config as unknown as Record<symbol, unknown>)[kTracked]) {
      return
    }
    warnedUntracked = true
    request.log.warn(
      `[scoped] route ${request.method} ${route.url} was declared before scopedSession finished loading, ` +
        'so a client abort may release its connection between two statements of its handler. ' +
        'Fix: await app.register(scopedSession, ...) before declaring routes.',
    )
  }

  done()
}

/**
 * The plugin. One database session per request: opened lazily on the first
 * statement, committed before the response is written (rolled back on a
 * thrown error, a 5xx, an abort or a timeout), released exactly once.
 *
 * @example
 * ```ts
 * import Fastify from 'fastify'
 * import { createScope, getSession } from '@scoped/core'
 * import { pgDriver } from '@scoped/pg'
 * import { scopedSession } from '@scoped/fastify'
 *
 * createScope({ driver: pgDriver(pool) }) // pool: the application's node-postgres Pool
 * const app = Fastify()
 * await app.register(scopedSession)
 * app.post('/orders', async () => {
 *   const { rows } = await getSession().use((c) => c.query('INSERT INTO orders DEFAULT VALUES RETURNING id'))
 *   return rows[0] // committed before the client sees it
 * })
 * ```
 */
export const scopedSession: FastifyPluginCallback<ScopedSessionOptions> = fp(scopedSessionPlugin, {
  name: '@scoped/fastify',
  fastify: '5.x',
})
