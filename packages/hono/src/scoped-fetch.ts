/**
 * `scopedFetch(app)`: the same unit of work per request as `scopedSession()`,
 * opened around `app.fetch` instead of inside Hono's chain.
 *
 * Why a second entry: any `app.use()` middleware makes Hono compose the
 * chain, so `app.fetch` returns a promise for every request, and
 * `@hono/node-server` leaves its synchronous path (a Response returned at once
 * is written in the same tick). Wrapping the fetch handler keeps that path for
 * a route whose handler answers synchronously and never makes a session: the
 * scope opens with `als.run`, ends with `endNow()`, and no promise of ours is
 * made.
 *
 * What it cannot see from outside the chain, and how it makes up for it:
 * - the Context: the route is matched again (lazily, only to name a session),
 *   and the app's error handler is wrapped (an accessor on `app.errorHandler`,
 *   so a later `app.onError()` is wrapped too) to learn that an Error was
 *   answered, which rolls back whatever the status;
 * - `c.error` for a sub-app's own `onError` (`app.route()` of a Hono that has
 *   one): that handler is not the app's; such routes are reported once.
 */
import type { Scope } from '@scoped/core'
import type { Env, ErrorHandler, Hono } from 'hono'
import { Context } from 'hono'
import {
  asError,
  commitReturned,
  describe,
  type ResolvedSessionOptions,
  resolveScope,
  resolveSessionOptions,
  type ScopedSessionOptions,
} from './options.js'
import { isTimeout, RequestLifecycle } from './request-lifecycle.js'
import { bodyIsFinished, cancelBody, inspectBody, keptHeaders } from './response-body.js'
import { patternAfter, routeName } from './route-name.js'

export interface ScopedFetchOptions extends Omit<ScopedSessionOptions, 'name'> {
  /**
   * The session's name in holders, stats, leak warnings and errors. Called
   * when the request arrives, before routing (there is no Context yet).
   * Default: the method and the route pattern, e.g. `GET /orders/:id`,
   * worked out only when a session is made.
   */
  name?: (request: Request) => string
}

/** What `scopedFetch()` returns: `app.fetch`'s signature, for `serve({ fetch })` and `export default`. */
export type ScopedFetch = (
  request: Request,
  env?: unknown,
  executionCtx?: unknown,
) => Response | Promise<Response>

/** The parts of a Hono app used here (`errorHandler` is public at runtime, `private` in its types). */
interface App {
  fetch: (request: Request, env?: unknown, executionCtx?: unknown) => Response | Promise<Response>
  errorHandler: ErrorHandler<any>
  router: Hono['router']
  getPath: (request: Request, options?: { env?: unknown }) => string
  routes: { method: string; path: string; handler: unknown }[]
}

/**
 * Where the request's lifecycle is kept for the error handler (which receives
 * only `c`): on the Request, and on @hono/node-server's per-request `env`
 * (`{ incoming, outgoing }`), which a re-dispatch inside the app
 * (`hono/method-override`: `app.fetch(new Request(...), c.env)`) passes on
 * unchanged while its Request is new.
 */
const lifeKey = Symbol('scoped.lifecycle')
type Tagged = { [lifeKey]?: RequestLifecycle<unknown> }

/** node-server's env: an object made for each request, so a tag on it is this request's only. */
function perRequestEnv(env: unknown): env is Tagged {
  return typeof env === 'object' && env !== null && 'incoming' in env && 'outgoing' in env
}

/** @internal The lifecycle scopedFetch() opened for the request of `c`, if it did. */
export function lifeOf(c: {
  req: { raw: Request }
  env: unknown
}): RequestLifecycle<unknown> | undefined {
  const life = (c.req.raw as Tagged)[lifeKey]
  if (life !== undefined) return life
  return perRequestEnv(c.env) ? c.env[lifeKey] : undefined
}

/** Per app, once: the application's own error handler, behind the wrapper. */
const tracking = Symbol('scoped.errorTracking')
interface Tracking {
  /** The application's handler (`app.onError`'s, or Hono's default). */
  handler: ErrorHandler<any>
  /** Sub-app routes with an error handler of their own were looked for (at the first request). */
  checked: boolean
}
type TrackedApp = App & { [tracking]?: Tracking }

/** Hono marks a sub-app's routes that run under the sub-app's own `onError` with this key. */
const COMPOSED_HANDLER = '__COMPOSED_HANDLER'

/**
 * Wrap `app.errorHandler` (now and whenever it is set again: `app.onError()`
 * assigns it) so that an Error Hono hands to it marks the request's unit of
 * work as answered by an error. Hono calls the handler for every Error thrown
 * in the app's chain, on its synchronous and asynchronous paths alike.
 */
function trackErrors(app: TrackedApp): Tracking {
  const existing = app[tracking]
  if (existing) return existing
  const t: Tracking = { handler: app.errorHandler, checked: false }
  const wrap = (handler: ErrorHandler<any>): ErrorHandler<any> =>
    function scopedErrorHandler(err, c) {
      const life = lifeOf(c)
      if (life !== undefined) life.errorAnswered(err)
      return handler(err, c)
    }
  let wrapped = wrap(t.handler)
  Object.defineProperty(app, 'errorHandler', {
    configurable: true,
    enumerable: true,
    get: () => wrapped,
    set: (handler: ErrorHandler<any>) => {
      t.handler = handler
      wrapped = wrap(handler)
    },
  })
  app[tracking] = t
  return t
}

/** Routes of sub-apps mounted with an `onError` of their own: their errors bypass the wrapper. */
function checkSubApps<C>(app: App, t: Tracking, scope: Scope<C>): void {
  t.checked = true
  const own = app.routes.filter(
    (r) => typeof r.handler === 'function' && COMPOSED_HANDLER in (r.handler as object),
  )
  if (own.length === 0) return
  const list = [...new Set(own.map((r) => `${r.method} ${r.path}`))].slice(0, 5).join(', ')
  scope.options.logger.warn(
    `[scoped/hono] scopedFetch(): ${own.length} route(s) belong to a sub-app with its own onError ` +
      `(${list}${own.length > 5 ? ', …' : ''}). An Error that handler answers is not seen by ` +
      'scopedFetch(), so its response is judged by status alone (a 4xx it returns commits). ' +
      'Call getSession().setRollbackOnly() in that onError, or set onError on the main app only.',
  )
}

/** The route match Hono did for this request, done again (only when a name or a Context is needed). */
function matchOf(app: App, request: Request, env: unknown) {
  const method = request.method === 'HEAD' ? 'GET' : request.method
  return app.router.match(method, app.getPath(request, { env }))
}

/** The default name, `GET /orders/:id`, from the routes the request matches. */
function routeNameOf(app: App, request: Request, env: unknown): string {
  const routes = matchOf(app, request, env)[0].map((m) => m[0][1])
  return `${request.method} ${patternAfter(routes, -1)}`
}

/**
 * Wrap a Hono app's `fetch` so every request runs in its own scope, with the
 * guarantees of `scopedSession()` (see the README for what differs): commit
 * before the response is sent, a failed COMMIT answered by the app's error
 * handler (default: a 500), a thrown Error rolled back whatever `app.onError`
 * answers, client aborts and timeouts, streaming bodies that keep the session
 * until they end. A request that never makes a session and whose handler
 * answers synchronously stays on `@hono/node-server`'s synchronous path.
 *
 * Everything the app runs (all middleware, every handler, `app.onError`,
 * `app.notFound`) is inside the scope.
 *
 * @param app the Hono app; its `errorHandler` is wrapped (once per app).
 * @param scope the scope to open sessions of; default: the default scope,
 *   looked up now.
 * @example
 * ```ts
 * const app = new Hono()
 * app.get('/orders/:id', async (c) => c.json(await findOrder(c.req.param('id'))))
 * serve({ fetch: scopedFetch(app), port: 3000 })
 * ```
 */
export function scopedFetch<E extends Env = any>(
  hono: Hono<E, any, any>,
  scope?: Scope<any>,
  options?: ScopedFetchOptions,
): ScopedFetch {
  const a = hono as unknown as TrackedApp
  if (
    typeof a !== 'object' ||
    a === null ||
    typeof a.fetch !== 'function' ||
    typeof a.router?.match !== 'function'
  ) {
    throw new TypeError(`scopedFetch(app): expected a Hono app, got ${describe(hono)}`)
  }
  const target = resolveScope(scope, 'scopedFetch', 'scopedFetch(app, scope)')
  const opts = resolveSessionOptions(options, 'scopedFetch', 'app, scope')
  const customName =
    opts.name === routeName ? undefined : (opts.name as unknown as (r: Request) => string)
  const t = trackErrors(a)
  // Hono's fetch is an own arrow function, bound to its app.
  const fetch = a.fetch
  const app: Wrapped = { app: a, tracking: t, opts }

  return function scopedFetch(request, env, executionCtx) {
    if (!t.checked) checkSubApps(a, t, target)
    let name: string | (() => string)
    if (customName === undefined) {
      // Read when a session is made (or an error names the scope): a request that never
      // queries matches no route twice.
      name = () => routeNameOf(a, request, env)
    } else {
      name = customName(request)
      if (typeof name !== 'string' || name === '') {
        throw new TypeError(
          `scopedFetch(app, scope, { name }): name(request) must return a non-empty string, got ${describe(name)}`,
        )
      }
    }
    // Client aborts are watched for from the scope's first session on (see RequestLifecycle).
    const onSession = () => life.watch()
    const open = target.open({ name, kind: 'request', onSession })
    const life = new RequestLifecycle(open, target, opts.cancelOnAbort, env, request)
    ;(request as Tagged)[lifeKey] = life
    if (perRequestEnv(env)) env[lifeKey] = life
    let res: Response | Promise<Response>
    try {
      res = open.enter(() => fetch(request, env, executionCtx))
    } catch (e) {
      // A non-Error thrown by a handler that ran synchronously (Hono rethrows those), or one
      // the error handler threw.
      return life.chainThrew(e)
    }
    if (typeof (res as Promise<Response>).then === 'function') {
      return (res as Promise<Response>).then(
        (r) => returned(app, life, r, request, env, executionCtx),
        (e: unknown) => life.chainThrew(e),
      )
    }
    return returned(app, life, res as Response, request, env, executionCtx)
  }
}

/** What every request of one `scopedFetch()` shares. */
interface Wrapped {
  app: App
  tracking: Tracking
  opts: ResolvedSessionOptions
}

/**
 * The app answered. The common case (no error answered, the client still
 * there, a finished body, a unit of work that ends without waiting: e.g. one
 * that never queried) ends here, synchronously; the rest goes to the async path.
 */
function returned<C>(
  w: Wrapped,
  life: RequestLifecycle<C>,
  res: Response,
  request: Request,
  env: unknown,
  executionCtx: unknown,
): Response | Promise<Response> {
  if (life.answered !== undefined || life.aborted || !bodyIsFinished(res)) {
    life.watch()
    life.chainSettled()
    const answer = (error: unknown) => answerFailure(w, request, env, executionCtx, error, res)
    return settleSlowly(life, res, w.opts, answer)
  }
  life.chainSettled()
  let commit: boolean
  try {
    commit = commitReturned(w.opts, res.status)
  } catch (e) {
    return life.rollback().then(() => answerFailure(w, request, env, executionCtx, e, res))
  }
  try {
    if (life.endNow(commit)) return res
  } catch (e) {
    return answerFailure(w, request, env, executionCtx, e, res)
  }
  return life.end(commit).then(
    () => res,
    (e: unknown) => answerFailure(w, request, env, executionCtx, e, res),
  )
}

/** Everything but the common case: an Error the error handler answered, a timeout, a client gone, a body to read ahead. */
async function settleSlowly<C>(
  life: RequestLifecycle<C>,
  res: Response,
  opts: ResolvedSessionOptions,
  answer: (error: unknown) => Promise<Response>,
): Promise<Response> {
  const handled = life.answered
  let commitHandled = false
  if (handled !== undefined && !isTimeout(handled)) {
    // Same contract as the middleware: the default commitOn rolls an answered Error back; a
    // custom one sees it and may keep the work.
    try {
      commitHandled = opts.commitOn({ status: res.status, error: handled }) === true
    } catch (e) {
      await life.rollback()
      return answer(e)
    }
  }
  if (life.aborted || (handled !== undefined && !commitHandled)) {
    // A timeout (aborted when the error handler saw it), a client gone, or an Error answered:
    // nothing commits. The response the app made goes out as it is; when its client is gone it
    // never will, and a body producer still writing (a stream() callback inside use()) would
    // wait forever for a reader, and the rollback for it: cancel the body first.
    if (life.closed) cancelBody(res)
    await life.rollback()
    return res
  }
  let commit: boolean
  try {
    commit = commitHandled || commitReturned(opts, res.status)
  } catch (e) {
    await life.rollback()
    return answer(e)
  }
  const body = await inspectBody(res, () => life.whenGone())
  if (body.kind === 'live') return life.liveResponse(res, body, commit)
  if (body.kind === 'failed') {
    await life.rollback()
    return answer(body.error)
  }
  try {
    await life.end(commit)
  } catch (e) {
    return answer(e)
  }
  return body.replacement ?? res
}

/**
 * A failed COMMIT (or a commitOn that threw, or a body that could not be
 * read): the app's response must not go out. The application's error handler
 * answers, as it would inside the chain, with a Context made for it (the
 * request, its env and route params; not the variables middleware set on the
 * request's own Context, which is out of reach here). The discarded response's
 * headers are on it, but for those that describe its body or claim what it did
 * (see `keptHeaders()`): CORS and request-id headers reach the client with the
 * 500, a `Set-Cookie` or `Location` does not. Hono's default answers 500. What
 * the handler throws rejects the fetch (node-server answers 500).
 */
async function answerFailure(
  w: Wrapped,
  request: Request,
  env: unknown,
  executionCtx: unknown,
  thrown: unknown,
  discarded: Response,
): Promise<Response> {
  const { app } = w
  const error = asError(thrown)
  const c = new Context(request, {
    env,
    executionCtx: executionCtx as never,
    path: app.getPath(request, { env }),
    matchResult: matchOf(app, request, env),
  })
  for (const [name, value] of keptHeaders(discarded.headers)) c.header(name, value)
  c.error = error
  return await w.tracking.handler(error, c as never)
}
