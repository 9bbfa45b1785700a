/**
 * The options of `scopedSession()`, checked once when the middleware is made,
 * so a typo fails at startup with a TypeError naming the option, not at the
 * first request.
 */
import type { Request } from 'express'

/** What `commitOn` is asked about: the response the chain produced. */
export interface CommitOutcome {
  /** `res.statusCode` when the response ends (`res.end()`, after your error handler ran). */
  status: number
  /**
   * The first error thrown, rejected or passed to `next(err)` after the
   * middleware (an `Error` or any other value), even if an error handler
   * answered it; `undefined` when there was none. The default rolls back
   * whenever it is set; a custom `commitOn` may commit anyway (a thrown 409
   * that is an answer, not a failure). An aborted request (client gone,
   * timeout) always rolls back without asking: there is no response to judge.
   */
  error: unknown
}

export interface ScopedSessionOptions {
  /**
   * The session's name in holders, stats, leak warnings and errors (and in
   * `pg_stat_activity` with `pgDriver(pool, { applicationName: 'auto' })`).
   * Default: the method and the route pattern, e.g. `GET /orders/:id`.
   *
   * Express knows the route only after routing, so the name is asked for when
   * it is first needed (the first `getSession()`, usually in the handler). A
   * name asked for before routing (`req.route` not set yet: a body parser's
   * `verify` hook, a middleware) is not kept, and `name(req)` is asked again.
   */
  name?: (req: Request) => string
  /**
   * Commit the unit of work for this response? Asked when the response ends.
   * Default ({@link defaultCommitOn}): nothing was thrown and `status < 500`
   * (so a returned 404 commits; a returned 500 or a thrown error rolls back).
   * Same contract in every `@scoped/*` adapter. An aborted request never
   * commits, whatever this returns.
   *
   * @example
   * ```ts
   * app.use(scopedSession(scope, { commitOn: ({ status }) => status < 400 }))
   * ```
   */
  commitOn?: (outcome: CommitOutcome) => boolean
  /**
   * When the client goes away (or a socket timeout fires) while a statement
   * runs, cancel it on the server. Default `false`: the statement runs to its
   * end, its result is discarded and the unit of work rolls back. Either way
   * the handler's next statement fails with `ScopeAbortedError`.
   */
  cancelOnAbort?: boolean
}

/** @internal */
export interface ResolvedSessionOptions {
  readonly name: ((req: Request) => string) | undefined
  readonly commitOn: (outcome: CommitOutcome) => boolean
  readonly cancelOnAbort: boolean
}

const known = ['name', 'commitOn', 'cancelOnAbort']

/** @internal A value, as error messages show it. */
export function describe(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v)
  if (typeof v === 'number' || typeof v === 'boolean') return String(v)
  if (Array.isArray(v)) return 'an array'
  return v === null ? 'null' : typeof v
}

/**
 * The default `commitOn`: nothing thrown and not a server error. Compose with it.
 *
 * @example
 * ```ts
 * // Commit a conflict the handler threw on purpose (and answered 409), like any 4xx.
 * const commitOn = (o: CommitOutcome) => defaultCommitOn(o) || o.error instanceof ConflictError
 * app.use(scopedSession(scope, { commitOn }))
 * ```
 */
export const defaultCommitOn = ({ status, error }: CommitOutcome): boolean =>
  error === undefined && status < 500

/** @internal Check every option and fill in the defaults. */
export function resolveSessionOptions(options: unknown): ResolvedSessionOptions {
  if (options === undefined) {
    return Object.freeze({ name: undefined, commitOn: defaultCommitOn, cancelOnAbort: false })
  }
  if (typeof options !== 'object' || options === null || Array.isArray(options)) {
    throw new TypeError(
      `scopedSession(scope, options): options must be an object, got ${describe(options)}`,
    )
  }
  const o = options as Record<string, unknown>
  for (const key of Object.keys(o)) {
    if (!known.includes(key)) {
      throw new TypeError(
        `scopedSession(scope, { ${key} }): unknown option. Known options: ${known.join(', ')}`,
      )
    }
  }
  if (o.name !== undefined && typeof o.name !== 'function') {
    throw new TypeError(
      `scopedSession(scope, { name }): expected a function (req) => string, got ${describe(o.name)}`,
    )
  }
  if (o.commitOn !== undefined && typeof o.commitOn !== 'function') {
    throw new TypeError(
      `scopedSession(scope, { commitOn }): expected a function ({ status, error }) => boolean, got ${describe(o.commitOn)}`,
    )
  }
  if (o.cancelOnAbort !== undefined && typeof o.cancelOnAbort !== 'boolean') {
    throw new TypeError(
      `scopedSession(scope, { cancelOnAbort }): expected a boolean, got ${describe(o.cancelOnAbort)}`,
    )
  }
  return Object.freeze({
    name: o.name as ResolvedSessionOptions['name'],
    commitOn: (o.commitOn as ResolvedSessionOptions['commitOn'] | undefined) ?? defaultCommitOn,
    cancelOnAbort: (o.cancelOnAbort as boolean | undefined) ?? false,
  })
}
