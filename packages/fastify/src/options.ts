/**
 * The plugin's options: what a user passes to `app.register(scopedSession, { ... })`,
 * checked once at registration, so a typo fails the boot instead of a request.
 */
import { getDefaultScope, type Scope } from '@scoped/core'
import type { FastifyRequest } from 'fastify'

/** What `commitOn` is asked about, once the response (or its end) is known. */
export interface CommitOutcome {
  /** The response's status code. */
  status: number
  /**
   * What was thrown (or passed to `reply.send(error)`) anywhere in the chain:
   * parser, hook, handler, serializer. `undefined` when nothing was.
   */
  error: unknown
}

/**
 * Options of `app.register(scopedSession, options)`; all optional.
 *
 * @example
 * ```ts
 * await app.register(scopedSession, {
 *   scope,                                                   // default: the default scope
 *   name: (request) => `api ${request.routeOptions.url}`,    // default: 'GET /orders/:id'
 *   commitOn: ({ status, error }) => !error && status < 400, // default: !error && status < 500
 *   cancelOnAbort: true,                                     // default: false
 * })
 * ```
 */
export interface ScopedSessionOptions {
  /** The scope whose sessions the requests get. Default: the default scope (`createScope({ driver })`). */
  scope?: Scope<any>
  /**
   * The session's name in holders, leak warnings, errors and (with
   * `applicationName: 'auto'`) `pg_stat_activity`. Default: `METHOD route-pattern`,
   * e.g. `GET /orders/:id`; `GET (no route)` for a 404.
   */
  name?: (request: FastifyRequest) => string
  /**
   * Commit the unit of work? Asked once, in `onSend`, before the response is
   * written. Default: nothing was thrown and `status < 500`. An aborted request
   * (client gone, timeout) never commits, whatever this returns.
   */
  commitOn?: (outcome: CommitOutcome) => boolean
  /**
   * When the client goes away (or a timeout fires) while a statement runs,
   * cancel it on the server (a CancelRequest on a separate short connection)
   * instead of letting it finish. Default false.
   */
  cancelOnAbort?: boolean
  /**
   * Decorate `request.session`. Default true. Pass false when another plugin
   * (e.g. `@fastify/session`) owns that name; `getSession()` works either way.
   */
  decorate?: boolean
}

/** @internal */
export interface ResolvedOptions {
  readonly scope: Scope<any>
  readonly name: ((request: FastifyRequest) => string) | undefined
  readonly commitOn: (outcome: CommitOutcome) => boolean
  readonly cancelOnAbort: boolean
  readonly decorate: boolean
}

/**
 * The default `commitOn`: nothing thrown and not a server error. Compose with it:
 *
 * @example
 * ```ts
 * await app.register(scopedSession, {
 *   // also commit when a handler throws a 409 it means as an answer
 *   commitOn: (o) => (o.error as { statusCode?: number })?.statusCode === 409 || defaultCommitOn(o),
 * })
 * ```
 */
export function defaultCommitOn({ status, error }: CommitOutcome): boolean {
  return error === undefined && status < 500
}

const known = new Set(['scope', 'name', 'commitOn', 'cancelOnAbort', 'decorate'])
/** What Fastify's `register()` itself accepts; it passes them on to every plugin. */
const registerOptions = new Set(['prefix', 'logLevel', 'logSerializers'])

function describe(v: unknown): string {
  if (typeof v === 'string' || typeof v === 'number') return JSON.stringify(v)
  return v === null ? 'null' : typeof v
}

function fail(option: string, expected: string, got: unknown): never {
  throw new TypeError(
    `app.register(scopedSession, { ${option} }): expected ${expected}, got ${describe(got)}`,
  )
}

/** @internal Check every option and fill in defaults; a wrong one is a TypeError naming it. */
export function resolveOptions(options: unknown): ResolvedOptions {
  const o = (options ?? {}) as Record<string, unknown>
  if (typeof o !== 'object') {
    throw new TypeError(
      `app.register(scopedSession, options): expected an object, got ${describe(o)}`,
    )
  }
  for (const key of Object.keys(o)) {
    if (!known.has(key) && !registerOptions.has(key)) {
      throw new TypeError(
        `app.register(scopedSession, { ${key} }): unknown option. Known options: ${[...known].join(', ')}`,
      )
    }
  }
  let scope = o.scope as Scope<any> | undefined
  if (scope === undefined) {
    scope = getDefaultScope()
    if (!scope) {
      throw new TypeError(
        'app.register(scopedSession): there is no scope to open sessions in. Pass one: ' +
          'app.register(scopedSession, { scope }), or create the default scope before registering: ' +
          'createScope({ driver: pgDriver(pool) }).',
      )
    }
  } else if (
    typeof scope !== 'object' ||
    scope === null ||
    typeof scope.open !== 'function' ||
    typeof scope.getSession !== 'function'
  ) {
    fail('scope', 'a Scope from createScope()', scope)
  }
  if (o.name !== undefined && typeof o.name !== 'function') {
    fail('name', 'a function (request) => string', o.name)
  }
  if (o.commitOn !== undefined && typeof o.commitOn !== 'function') {
    fail('commitOn', 'a function ({ status, error }) => boolean', o.commitOn)
  }
  if (o.cancelOnAbort !== undefined && typeof o.cancelOnAbort !== 'boolean') {
    fail('cancelOnAbort', 'a boolean', o.cancelOnAbort)
  }
  if (o.decorate !== undefined && typeof o.decorate !== 'boolean') {
    fail('decorate', 'a boolean', o.decorate)
  }
  return Object.freeze({
    scope,
    name: o.name as ResolvedOptions['name'],
    commitOn: (o.commitOn as ResolvedOptions['commitOn'] | undefined) ?? defaultCommitOn,
    cancelOnAbort: (o.cancelOnAbort as boolean | undefined) ?? false,
    decorate: (o.decorate as boolean | undefined) ?? true,
  })
}
