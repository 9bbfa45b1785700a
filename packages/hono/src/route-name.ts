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
  return routeNameAt(c, c.req.routeIndex)
}

/**
 * The default name, read only when something asks for it (a session is made,
 * an error names the scope): a request that never queries builds no name.
 * `c.req.routeIndex` moves on as the chain runs, so the middleware's own
 * index is taken now.
 */
export function lazyRouteName(c: Context): () => string {
  const index = c.req.routeIndex
  let name: string | undefined
  return () => (name ??= routeNameAt(c, index))
}

/** The name as seen from the middleware at `index` in the matched routes. */
function routeNameAt(c: Context, index: number): string {
  // `matchedRoutes` is deprecated in favour of `hono/route`, which hono < 4.8
  // lacks; the getter reads the same match result in every 4.x.
  return `${c.req.method} ${patternAfter(c.req.matchedRoutes, index)}`
}

/**
 * The pattern of the route that handles a request whose matched routes are
 * `routes`, as seen from the entry at `index` (-1: from outside the app,
 * `scopedFetch()`): the first method route after it, else the first route
 * after it that is not a wildcard, else its own pattern (`*` from outside).
 */
export function patternAfter(
  routes: readonly { method: string; path: string }[],
  index: number,
): string {
  const after = index + 1
  for (let i = after; i < routes.length; i++) {
    if (routes[i]!.method !== ALL) return routes[i]!.path
  }
  for (let i = after; i < routes.length; i++) {
    if (!routes[i]!.path.endsWith('*')) return routes[i]!.path
  }
  return routes[index]?.path ?? '*'
}
