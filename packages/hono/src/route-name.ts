/**
 * The default session name: `GET /orders/:id`.
 *
 * Hono routes a request before the first middleware runs, so the route that
 * will handle it is already known when the scope opens: it is the first
 * matched route after this middleware that was registered for a method
 * (`app.get`, `app.post`, …). Middleware is registered for every method
 * (`ALL`), so it is skipped; `app.all('/x')` is taken when no method route
 * matched. A request no route matches is named after the middleware's own
 * pattern (`GET /*`), never after the raw URL, so names stay few (they are
 * labels in stats and `pg_stat_activity`).
 */
import type { Context } from 'hono'

/** Hono's method name for routes registered with `use()` and `all()`. */
const ALL = 'ALL'

export function routeName(c: Context): string {
  // `matchedRoutes` is deprecated in favour of `hono/route`, which hono < 4.8
  // lacks; the getter reads the same match result in every 4.x.
  const routes = c.req.matchedRoutes
  const after = c.req.routeIndex + 1
  let pattern: string | undefined
  for (let i = after; i < routes.length; i++) {
    if (routes[i]!.method !== ALL) {
      pattern = routes[i]!.path
      break
    }
  }
  if (pattern === undefined) {
    for (let i = after; i < routes.length; i++) {
      if (!routes[i]!.path.endsWith('*')) {
        pattern = routes[i]!.path
        break
      }
    }
  }
  pattern ??= routes[c.req.routeIndex]?.path ?? '*'
  return `${c.req.method} ${pattern}`
}
