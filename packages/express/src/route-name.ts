/**
 * The session's name: `GET /orders/:id`.
 *
 * Express routes a request while it walks the chain, so when the middleware
 * opens the scope nothing knows yet which route will answer. The name is
 * therefore resolved when it is first read (the session is made on the first
 * `getSession()`, which is usually in the handler, after routing): once
 * `req.route` is set, the name is the method, the mount path (`req.baseUrl`)
 * and the route's pattern, and it is kept. Read before routing (a body
 * parser's `verify` hook, a middleware), it is the method and the mount path
 * of the middleware with `/*` (`POST /*`), and it is not kept. Never the raw
 * URL: names are labels in stats and `pg_stat_activity`, so they stay few.
 */
import type { Request } from 'express'
import { describe } from './options.js'

/** `METHOD baseUrl+pattern` once routed, `undefined` before. */
export function routeName(req: Request): string | undefined {
  const route = (req as { route?: { path?: unknown } }).route
  if (route === undefined || route === null) return undefined
  const raw = route.path
  const pattern = typeof raw === 'string' ? raw : Array.isArray(raw) ? raw.join('|') : String(raw)
  const base = req.baseUrl ?? ''
  // A router mounted at /api with a route '/' answers /api, not /api/.
  const path = base !== '' && pattern === '/' ? base : `${base}${pattern}`
  return `${req.method} ${path}`
}

/**
 * The name of one request's scope, resolved lazily (see above). `custom` is
 * the user's `name(req)`; its result is checked, and a bad one is a TypeError
 * naming the option, thrown from the `getSession()` that asked.
 */
export class RequestName {
  #req: Request
  #custom: ((req: Request) => string) | undefined
  #fallback: string
  #resolved: string | undefined

  constructor(req: Request, custom: ((req: Request) => string) | undefined) {
    this.#req = req
    this.#custom = custom
    this.#fallback = `${req.method} ${req.baseUrl ?? ''}/*`
  }

  /** The provisional name, for `scope.open()` (which wants one before routing). */
  get provisional(): string {
    return this.#fallback
  }

  get current(): string {
    if (this.#resolved !== undefined) return this.#resolved
    const req = this.#req
    const routed = (req as { route?: unknown }).route !== undefined
    let name: unknown
    if (this.#custom) {
      name = this.#custom(req)
      if (typeof name !== 'string' || name === '') {
        throw new TypeError(
          `scopedSession(scope, { name }): name(req) must return a non-empty string, got ${describe(name)}`,
        )
      }
    } else {
      name = routeName(req) ?? this.#fallback
    }
    if (routed) this.#resolved = name as string
    return name as string
  }
}
