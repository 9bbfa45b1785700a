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
 * The name of one request's scope, resolved lazily (see above), made when
 * it is first read (`scope.open({ name })` is given a function). `custom` is
 * the user's `name(req)`. Core code reads the name too (an abort's error
 * message is built from it, inside a socket listener), so reading it never
 * throws: a `name(req)` that throws or returns no usable string is reported
 * once through `onError` as a TypeError naming the option, and the default
 * name is used instead.
 */
export class RequestName {
  #req: Request
  #custom: ((req: Request) => string) | undefined
  #onError: (error: unknown) => void
  #fallback: string
  #resolved: string | undefined
  #failed = false

  /** `base`: the mount path of the middleware (`req.baseUrl` when it ran). */
  constructor(
    req: Request,
    custom: ((req: Request) => string) | undefined,
    base: string,
    onError: (error: unknown) => void,
  ) {
    this.#req = req
    this.#custom = custom
    this.#onError = onError
    this.#fallback = `${req.method} ${base}/*`
  }

  get current(): string {
    if (this.#resolved !== undefined) return this.#resolved
    const req = this.#req
    const routed = (req as { route?: unknown }).route !== undefined
    const name = (this.#custom && this.#ask(this.#custom)) ?? routeName(req) ?? this.#fallback
    if (routed) this.#resolved = name
    return name
  }

  #ask(custom: (req: Request) => string): string | undefined {
    if (this.#failed) return undefined
    let name: unknown
    let error: unknown
    try {
      name = custom(this.#req)
      if (typeof name !== 'string' || name === '') {
        error = new TypeError(
          `scopedSession(scope, { name }): name(req) must return a non-empty string, got ${describe(name)}; the default name is used instead`,
        )
      }
    } catch (e) {
      error = new TypeError(
        `scopedSession(scope, { name }): name(req) threw; the default name is used instead`,
        { cause: e },
      )
    }
    if (error === undefined) return name as string
    this.#failed = true
    this.#onError(error)
    return undefined
  }
}
