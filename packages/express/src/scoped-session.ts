/**
 * `scopedSession()`: one database session per Express request, committed
 * before the response is sent, released on every path.
 */
import { getDefaultScope, type Scope } from '@scoped/core'
import type { RequestHandler } from 'express'
import { describe, resolveSessionOptions, type ScopedSessionOptions } from './options.js'
import { installHooks, RequestUnit } from './request-unit.js'
import { ensureRouterTracing, unitOf } from './router-tracing.js'

function resolveScope<C>(scope: Scope<C> | undefined): Scope<C> {
  if (scope === undefined) {
    const fallback = getDefaultScope()
    if (!fallback) {
      throw new Error(
        'scopedSession(): there is no default scope to use. Create it before mounting the ' +
          'middleware (createScope({ driver }) makes the default scope unless default: false), ' +
          'or pass your scope: app.use(scopedSession(scope)).',
      )
    }
    return fallback as Scope<C>
  }
  const s = scope as unknown as Record<string, unknown> | null
  if (typeof s !== 'object' || s === null || typeof s.open !== 'function') {
    const looksLikeOptions =
      typeof s === 'object' &&
      s !== null &&
      ['name', 'commitOn', 'cancelOnAbort'].some((k) => k in s)
    throw new TypeError(
      `scopedSession(scope): expected a Scope from createScope(), got ${describe(scope)}.` +
        (looksLikeOptions
          ? ' To use the default scope with options, pass undefined first: scopedSession(undefined, options).'
          : ' Pass nothing to use the default scope.'),
    )
  }
  return scope
}

/**
 * Express 5 middleware: every request runs in its own scope, so `getSession()`
 * anywhere in the chain after it (body parsers and their `verify` hooks,
 * middleware, the handler, helpers, timers, error handlers, listeners on
 * `req`/`res`) returns that request's session. The session checks a
 * connection out on its first statement only.
 *
 * The unit of work ends when the response ends (`res.end()`, which `res.json`,
 * `res.send` and Express's final handler all call): it COMMITs, with the end
 * held back until the COMMIT settled, when `commitOn` agrees (default: nothing
 * was thrown or passed to `next(err)`, and status < 500); otherwise it rolls
 * back. A failed COMMIT
 * answers 500 instead, or cuts the connection if the response had already
 * begun (`res.write()`, `res.writeHead()`). A client that goes away or a socket
 * timeout aborts the unit of work: it rolls back, and the connection is
 * released once the handler settled.
 *
 * @param scope the scope to open sessions of; default: the default scope
 *   (`getDefaultScope()`), looked up now, when the middleware is made.
 * @example
 * ```ts
 * import express from 'express'
 * import { getSession } from '@scoped/core'
 * import { scopedSession } from '@scoped/express'
 *
 * const app = express()
 * app.use(scopedSession())
 * app.post('/orders', async (req, res) => {
 *   await getSession().use((db) => db.query('INSERT INTO orders DEFAULT VALUES'))
 *   res.status(201).json({ ok: true })        // committed before this is sent
 * })
 * app.listen(3000)
 * ```
 */
export function scopedSession<C = unknown>(
  scope?: Scope<C>,
  options?: ScopedSessionOptions,
): RequestHandler {
  const target = resolveScope(scope) as Scope<unknown>
  const opts = resolveSessionOptions(options)
  ensureRouterTracing()
  installHooks()

  return function scopedSessionMiddleware(req, res, next) {
    // Mounted twice for one scope (app and router): the outer scope already covers the chain.
    const first = unitOf<RequestUnit>(res)
    for (let u = first; u !== undefined; u = u.inner) {
      if (u.scope === target) {
        next()
        return
      }
    }
    let unit: RequestUnit
    try {
      unit = new RequestUnit(target, req, res, opts, first)
    } catch (e) {
      next(e) // the scope is closed (ScopeClosedError): Express answers it like any error
      return
    }
    unit.run(next, first)
  }
}
