/**
 * The options of `scopedSession()`, checked once when the middleware is made,
 * so a typo fails at startup with a TypeError naming the option, not at the
 * first request.
 */
import { getDefaultScope, type Scope } from '@scoped/core'
import type { Context } from 'hono'
import { routeName } from './route-name.js'

/** What `commitOn` is asked about: the status the response carries. */
export interface CommitOutcome {
  /** The status of the response the chain produced (after `app.onError`, if it ran). */
  status: number
  /**
   * The `Error` thrown in the chain and answered by `app.onError`, or
   * `undefined`. The default rolls back whenever it is set; a custom
   * `commitOn` may commit anyway (e.g. a thrown 409 that is an answer, not a
   * failure). A thrown non-`Error` value, a timeout and a client abort always
   * roll back without asking: there is no response to judge.
   */
  error: unknown
}

export interface ScopedSessionOptions {
  /**
   * The session's name in holders, stats, leak warnings and errors (and in
   * `pg_stat_activity` with `pgDriver(pool, { applicationName: 'auto' })`).
   * Default: the method and the route pattern, e.g. `GET /orders/:id`.
   */
  name?: (c: Context) => string
  /**
   * Commit the unit of work for this outcome? Default: nothing was thrown and
   * `status < 500` (so a returned 404 commits; a returned 500 or a thrown error
   * rolls back). Same contract in every `@scoped/*` adapter.
   *
   * @example
   * ```ts
   * app.use(scopedSession(scope, { commitOn: ({ status }) => status < 400 }))
   * ```
   */
  commitOn?: (outcome: CommitOutcome) => boolean
  /**
   * When the client goes away, also cancel the statement running on the
   * server (PostgreSQL `pg_cancel_backend` semantics). Default `false`: the
   * statement runs to its end, its result is discarded and the unit of work
   * rolls back. Either way the handler's next statement fails with
   * `ScopeAbortedError`.
   */
  cancelOnAbort?: boolean
}

/** @internal */
export interface ResolvedSessionOptions {
  name: (c: Context) => string
  commitOn: (outcome: CommitOutcome) => boolean
  cancelOnAbort: boolean
}

const known = ['name', 'commitOn', 'cancelOnAbort']

/** @internal A value as an error message shows it. */
export function describe(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v)
  if (typeof v === 'number' || typeof v === 'boolean') return String(v)
  return v === null ? 'null' : typeof v
}

/** The default `commitOn`: nothing thrown and not a server error. Compose with it. */
export const defaultCommitOn = ({ status, error }: CommitOutcome): boolean =>
  error === undefined && status < 500

/**
 * @internal Check every option and fill in the defaults. `entry` names the
 * function in error messages (`scopedSession`, `scopedFetch`).
 */
export function resolveSessionOptions(
  options: unknown,
  entry: string,
  scopeArg = 'scope',
): ResolvedSessionOptions {
  if (options === undefined) {
    return { name: routeName, commitOn: defaultCommitOn, cancelOnAbort: false }
  }
  if (typeof options !== 'object' || options === null || Array.isArray(options)) {
    throw new TypeError(
      `${entry}(${scopeArg}, options): options must be an object, got ${describe(options)}`,
    )
  }
  const o = options as Record<string, unknown>
  for (const key of Object.keys(o)) {
    if (!known.includes(key)) {
      throw new TypeError(
        `${entry}(${scopeArg}, { ${key} }): unknown option. Known options: ${known.join(', ')}`,
      )
    }
  }
  for (const key of ['name', 'commitOn'] as const) {
    if (o[key] !== undefined && typeof o[key] !== 'function') {
      throw new TypeError(
        `${entry}(${scopeArg}, { ${key} }): expected a function, got ${describe(o[key])}`,
      )
    }
  }
  if (o.cancelOnAbort !== undefined && typeof o.cancelOnAbort !== 'boolean') {
    throw new TypeError(
      `${entry}(${scopeArg}, { cancelOnAbort }): expected a boolean, got ${describe(o.cancelOnAbort)}`,
    )
  }
  const commitOn = o.commitOn as ResolvedSessionOptions['commitOn'] | undefined
  return {
    name: (o.name as ResolvedSessionOptions['name'] | undefined) ?? routeName,
    commitOn: commitOn
      ? checkedCommitOn(commitOn, `${entry}(${scopeArg}, { commitOn })`)
      : defaultCommitOn,
    cancelOnAbort: (o.cancelOnAbort as boolean | undefined) ?? false,
  }
}

/**
 * A custom `commitOn` that must answer true or false: anything else (a
 * Promise from an async function, undefined from a forgotten `return`) would
 * quietly roll back work behind a 2xx. It throws instead, which rolls back
 * and answers 500, with a message that says why.
 */
function checkedCommitOn(
  commitOn: ResolvedSessionOptions['commitOn'],
  where: string,
): ResolvedSessionOptions['commitOn'] {
  return (outcome) => {
    const answer: unknown = commitOn(outcome)
    if (typeof answer === 'boolean') return answer
    const thenable = typeof (answer as { then?: unknown } | null)?.then === 'function'
    throw new TypeError(
      `${where}: commitOn must return true or false, got ${
        thenable
          ? 'a Promise (it cannot be async: it decides before the response is sent)'
          : describe(answer)
      }`,
    )
  }
}

/** @internal `commitOn` for a response the app returned; the default needs no outcome object. */
export function commitReturned(opts: ResolvedSessionOptions, status: number): boolean {
  return opts.commitOn === defaultCommitOn
    ? status < 500
    : opts.commitOn({ status, error: undefined }) === true
}

/** @internal What a failed COMMIT (or a body that could not be read) is thrown as. */
export function asError(e: unknown): Error {
  return e instanceof Error ? e : new Error(`COMMIT failed: ${String(e)}`, { cause: e })
}

/**
 * @internal The scope given, or the default scope (looked up now). `entry`
 * and `usage` name the function and show how to pass a scope in messages.
 */
export function resolveScope<C>(
  scope: Scope<C> | undefined,
  entry: 'scopedSession' | 'scopedFetch',
  usage: string,
): Scope<C> {
  const middleware = entry === 'scopedSession'
  const args = middleware ? '' : 'app, '
  if (scope === undefined) {
    const fallback = getDefaultScope()
    if (!fallback) {
      throw new Error(
        `${entry}(): there is no default scope to use. Create it before ` +
          (middleware ? 'mounting the middleware ' : 'calling scopedFetch() ') +
          '(createScope({ driver }) makes the default scope unless default: false), ' +
          `or pass your scope: ${usage}.`,
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
      `${entry}(${args}scope): expected a Scope from createScope(), got ${describe(scope)}.` +
        (looksLikeOptions
          ? ` To use the default scope with options, pass undefined ${middleware ? 'first' : 'as the scope'}: ${entry}(${args}undefined, options).`
          : ' Pass nothing to use the default scope.'),
    )
  }
  return scope
}
