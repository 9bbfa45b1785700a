/**
 * `scopedSession()`: one database session per Hono request, committed before
 * the response is sent, released on every path.
 */
import type { Scope } from '@scoped/core'
import type { Context, MiddlewareHandler } from 'hono'
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
import {
  bodyIsFinished,
  cancelBody,
  claimHeaders,
  inspectBody,
  keptHeaders,
} from './response-body.js'
import { lazyRouteName, routeName } from './route-name.js'
import { lifeOf } from './scoped-fetch.js'

/**
 * The scopes whose middleware already runs for a request, on its Context: a
 * second mount of the same scope (the app and a sub-app under `app.route()`),
 * or a mount in an app served by `scopedFetch()` of the same scope, joins the
 * request's unit of work instead of opening another.
 */
const kMounted = Symbol('scoped.mounted')
type Mounted = { [kMounted]?: Scope<unknown> | Scope<unknown>[] }

/** Mark `target` as running for `c`; false when it already was (the chain is covered). */
function markMounted(c: Context, target: Scope<unknown>): boolean {
  const marked = c as unknown as Mounted
  const mounted = marked[kMounted]
  if (mounted === undefined) {
    // Served by scopedFetch() of the same scope: its unit of work already covers the app.
    if (lifeOf(c)?.scope === target) return false
    marked[kMounted] = target
    return true
  }
  if (mounted === target) return false
  const list = Array.isArray(mounted) ? mounted : [mounted]
  if (list.includes(target)) return false
  marked[kMounted] = [...list, target]
  return true
}

/** Replace the response outright: Hono's `c.res` setter would merge the old one's headers in. */
function replaceResponse(c: Context, res: Response | undefined): void {
  c.res = undefined
  if (res) c.res = res
}

/**
 * Hono middleware: every request runs in its own scope, so `getSession()`
 * anywhere in the chain after it (middleware, handler, `app.onError`, helpers,
 * timers, a `stream()` callback) returns that request's session. The session
 * checks a connection out on its first statement only.
 *
 * The unit of work COMMITs before the response is sent when nothing was thrown
 * and `commitOn` agrees (default: status < 500); otherwise it rolls back. A
 * failed COMMIT is thrown to `app.onError` (default: a 500). A body still
 * being produced after the handler returned (`stream()`, `streamSSE()`) keeps
 * the session until it ends; a failed COMMIT then cuts the response off.
 *
 * @param scope the scope to open sessions of; default: the default scope
 *   (`getDefaultScope()`), looked up now, when the middleware is made.
 * @example
 * ```ts
 * import { serve } from '@hono/node-server'
 * import { Hono } from 'hono'
 * import { getSession } from '@scoped/core'
 * import { scopedSession } from '@scoped/hono'
 *
 * const app = new Hono()
 * app.use(scopedSession())
 * app.post('/orders', async (c) => {
 *   await getSession().use((db) => db.query('INSERT INTO orders DEFAULT VALUES'))
 *   return c.json({ ok: true }, 201)          // committed before this is sent
 * })
 * serve({ fetch: app.fetch, port: 3000 })
 * ```
 */
export function scopedSession<C = unknown>(
  scope?: Scope<C>,
  options?: ScopedSessionOptions,
): MiddlewareHandler {
  const target = resolveScope(scope, 'scopedSession', 'app.use(scopedSession(scope))')
  const opts = resolveSessionOptions(options, 'scopedSession')

  const defaultName = opts.name === routeName

  return function scopedSession(c, next) {
    if (!markMounted(c, target as Scope<unknown>)) return next()
    let name: string | (() => string)
    if (defaultName) name = lazyRouteName(c)
    else {
      // A custom name(c) runs now, where it was always run (what c.req.param() sees here),
      // and a bad one fails the request even when it never queries.
      name = opts.name(c)
      if (typeof name !== 'string' || name === '') {
        throw new TypeError(
          `scopedSession(scope, { name }): name(c) must return a non-empty string, got ${describe(name)}`,
        )
      }
    }
    // hono/request-id's middleware, when mounted before this one, names the request in holders.
    const requestId: unknown = c.get('requestId')
    // Client aborts are watched for from the moment the scope makes a session: before that
    // there is nothing to abort, and a request that never queries adds no listener.
    const onSession = () => life.watch()
    const open = target.open(
      typeof requestId === 'string'
        ? { name, kind: 'request', requestId, onSession }
        : { name, kind: 'request', onSession },
    )
    const life = new RequestLifecycle(open, target, opts.cancelOnAbort, c.env, c.req.raw)
    const errorBefore = c.error
    let chain: Promise<void>
    try {
      chain = open.enter(next)
    } catch (e) {
      chain = Promise.reject(e)
    }
    // Not an async function: a request whose unit of work ends at once (nothing to commit, a
    // finished body) settles in the one reaction below, without promises of our own.
    return chain.then(
      () => chainReturned(c, life, opts, errorBefore),
      (e: unknown) => life.chainThrew(e),
    )
  }
}

/**
 * The chain returned. The common case (no error, the client still there, a
 * finished body, a unit of work that ends without waiting: e.g. one that never
 * queried) ends here synchronously; the rest goes to the async path.
 */
function chainReturned<C>(
  c: Context,
  life: RequestLifecycle<C>,
  opts: ResolvedSessionOptions,
  errorBefore: unknown,
): Promise<void> | undefined {
  if (c.error !== errorBefore || life.aborted || !bodyIsFinished(c.res)) {
    // Whatever happens now may outlive this reaction (a body to read, a rollback to
    // wait for): watch the response, as a scope with a session already does.
    life.watch()
    life.chainSettled()
    return settleSlowly(c, life, opts, errorBefore)
  }
  life.chainSettled()
  let commit: boolean
  try {
    commit = commitReturned(opts, c.res.status)
  } catch (e) {
    return life.chainThrew(e)
  }
  try {
    if (life.endNow(commit)) return undefined
  } catch (e) {
    commitFailed(c, e)
  }
  return life.end(commit).then(undefined, (e: unknown) => commitFailed(c, e))
}

/** COMMIT failed (or the unit of work was aborted, or its connection taken): the handler's response must not go out. app.onError answers instead. */
function commitFailed(c: Context, e: unknown): never {
  discardResponse(c)
  throw asError(e)
}

/**
 * Drop the handler's response and the headers that describe it or claim what
 * it did (content-*, ETag, Location, Set-Cookie, Cache-Control, …; see
 * `keptHeaders()`), keep the rest (CORS, request ids, set by middleware before
 * this one): Hono builds app.onError's answer on the Context's prepared
 * headers (what `c.header()`/`setCookie()` wrote, often the same object the
 * handler's `c.json()` used), so a `Set-Cookie` of a login that rolled back
 * would otherwise go out with the 500, and a browser needs
 * Access-Control-Allow-Origin to read it.
 *
 * The response's own headers are only read, never changed: they may be
 * immutable (`Response.redirect()`, a proxied `fetch()`), and deleting from
 * them would throw a TypeError in place of the COMMIT's error.
 */
function discardResponse(c: Context): void {
  const headers = c.res.headers
  const kept = keptHeaders(headers)
  const names = new Set([...headers.keys(), ...claimHeaders])
  replaceResponse(c, undefined)
  // With no response in place, c.header() writes to the prepared headers (on a finalized
  // Context it would copy the response instead). They may be the response's own headers
  // object (c.json() with nothing set before), or an older set (c.redirect()'s Location, an
  // ETag set with c.header() before c.body(), copied into the response; a Set-Cookie set
  // before returning a Response of its own): clear there every name the response had and
  // every claim header, then put back those the 500 keeps.
  c.finalized = false
  for (const name of names) c.header(name, undefined)
  for (const [name, value] of kept) c.header(name, value)
}

/** Everything but the common case: an Error app.onError answered, a timeout, a client gone, a body to read ahead. */
async function settleSlowly<C>(
  c: Context,
  life: RequestLifecycle<C>,
  opts: ResolvedSessionOptions,
  errorBefore: unknown,
): Promise<void> {
  const handled = c.error !== errorBefore ? c.error : undefined
  let commitHandled = false
  if (handled !== undefined && !isTimeout(handled)) {
    // An Error that app.onError turned into a response: the default commitOn rolls it
    // back; a custom one sees the error and may keep the work (e.g. a thrown 409 that
    // is an answer, not a failure).
    try {
      commitHandled = opts.commitOn({ status: c.res.status, error: handled }) === true
    } catch (e) {
      await life.rollback()
      throw e
    }
  }
  if (handled !== undefined && !commitHandled) {
    // A timeout middleware answered while the handler still runs: stop its statement.
    if (isTimeout(handled)) life.abort('timeout', true)
    const answer = c.res
    await life.rollback()
    // The orphan fails too (its checkout or statement was cut short by the abort), and its
    // error reaches app.onError some microtask turns later, however deep its call chain: let
    // it land before restoring the timeout's answer, or its 500 would replace the 504.
    await new Promise<void>((resolve) => setTimeout(resolve, 0))
    // The orphaned handler's own failure (its cancelled statement) went through
    // app.onError meanwhile and replaced the response: the chain had answered.
    if (c.res !== answer) replaceResponse(c, answer)
    c.error = handled
    return
  }

  if (life.aborted) {
    // The client left while the chain ran: no body will be read, nothing commits. A body
    // producer still writing (a stream() callback inside use()) would wait forever for a
    // reader, and the rollback for it: cancel the body first.
    if (life.closed) cancelBody(c.res)
    await life.rollback()
    return
  }

  let commit: boolean
  try {
    commit = commitHandled || commitReturned(opts, c.res.status)
  } catch (e) {
    await life.rollback()
    throw e
  }
  await inspectThenEnd(c, life, commit)
}

/** A body that may still be produced: read ahead to tell, then end now or when it ends. */
async function inspectThenEnd<C>(
  c: Context,
  life: RequestLifecycle<C>,
  commit: boolean,
): Promise<void> {
  const body = await inspectBody(c.res, () => life.whenGone())
  if (body.kind === 'live') {
    replaceResponse(c, life.liveResponse(c.res, body, commit))
    return
  }
  if (body.kind === 'failed') {
    await life.rollback()
    discardResponse(c)
    throw asError(body.error)
  }
  try {
    await life.end(commit)
  } catch (e) {
    commitFailed(c, e)
  }
  if (body.replacement) replaceResponse(c, body.replacement)
}
