/**
 * Every error this library throws on purpose. Each has a stable `code` to
 * match on, and a message that says what happened, to which session, and
 * how to fix it.
 */

import type { PoolStats } from './driver.js'
import type { Holder } from './holders.js'

export type ScopedErrorCode =
  | 'NO_ACTIVE_SCOPE'
  | 'SESSION_CLOSED'
  | 'POOL_TIMEOUT'
  | 'SCOPE_CLOSED'
  | 'SCOPE_ABORTED'
  | 'TRANSACTION_STATE'

export class ScopedError extends Error {
  readonly code: ScopedErrorCode
  constructor(code: ScopedErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.code = code
    this.name = new.target.name
  }
}

/** `getSession()` (or a query through a scoped facade) ran outside any scope. */
export class NoActiveScopeError extends ScopedError {
  readonly scopeName: string
  /** With `scopeName` undefined: a top-level function was called and there is no default scope. */
  constructor(scopeName: string | undefined, call: string) {
    super(
      'NO_ACTIVE_SCOPE',
      scopeName === undefined
        ? `${call} was called, but there is no default scope for it to use. ` +
            'Fix: create one first, createScope({ driver }) (the first scope is the default ' +
            'unless default: false), or call the method on your scope object.'
        : `${call} was called outside a scope of '${scopeName}'. ` +
            'There is no request or job here to own a database session. ' +
            'Fix: mount the middleware (app.use(scopedSession()) / app.register(scopedSession)), ' +
            'or wrap the code in runJob(async () => { ... }) or scope.run(...).',
    )
    this.scopeName = scopeName ?? ''
  }
}

/** A session was used after it was closed: work that outlived its request or job. */
export class SessionClosedError extends ScopedError {
  readonly sessionId: string
  readonly sessionName: string
  constructor(
    session: { id: string; name: string },
    call: string,
    how: string,
    site: { label: string; stack: string | undefined } | undefined,
  ) {
    super(
      'SESSION_CLOSED',
      `${call} on session '${session.name}' (${session.id}), which is closed: ${how}. ` +
        'Work that outlives its request or job (a promise nobody awaited, a session kept in ' +
        'module scope) must not use it. Fix: await the work inside the handler, or run ' +
        'background work in its own runJob(...).' +
        (site?.stack
          ? `\n${site.label}:\n${site.stack}`
          : ' (set captureStacks: true to see where it was used or closed)'),
    )
    this.sessionId = session.id
    this.sessionName = session.name
  }
}

/** Waiting for a pooled connection took longer than `acquireTimeoutMs`. */
export class PoolTimeoutError extends ScopedError {
  readonly holders: Holder[]
  readonly pool: PoolStats | undefined
  constructor(
    scopeName: string,
    sessionName: string,
    timeoutMs: number,
    pool: PoolStats | undefined,
    holders: Holder[],
  ) {
    const figures = pool
      ? `pool '${scopeName}': ${pool.total - pool.idle}/${pool.max} in use, ${pool.idle} idle, ${pool.waiting} waiting`
      : `pool '${scopeName}'`
    const list = holders.length
      ? holders
          .map(
            (h) =>
              `  - '${h.name}' (${h.id}) held ${h.heldMs} ms, ${h.state}` +
              (h.site ? `, acquired at ${h.site}` : ''),
          )
          .join('\n')
      : '  (no session of this scope holds a connection: the pool is used by something else)'
    super(
      'POOL_TIMEOUT',
      `Session '${sessionName}' waited ${timeoutMs} ms for a connection and gave up (${figures}).\n` +
        `Connections held now:\n${list}\n` +
        'Fix: find the holder above that should not be holding (a slow query, a hung handler, ' +
        'an unreleased session), or raise the pool size; set leakDetectionMs to be warned early.',
    )
    this.holders = holders
    this.pool = pool
  }
}

/** A new scope was asked of a scope that is closing or closed. */
export class ScopeClosedError extends ScopedError {
  constructor(scopeName: string, call: string) {
    super(
      'SCOPE_CLOSED',
      `${call}: scope '${scopeName}' is closed (scope.close() was called), so it starts no new ` +
        'sessions. Fix: stop accepting work before closing, or create a new scope.',
    )
  }
}

export type AbortKind = 'client-abort' | 'timeout' | 'signal' | 'shutdown'

/** The request or job was aborted (client went away, timeout, signal); its unit of work rolls back. */
export class ScopeAbortedError extends ScopedError {
  readonly kind: AbortKind
  constructor(
    sessionName: string,
    kind: AbortKind,
    detail?: string,
    options?: { cause?: unknown },
  ) {
    const why: Record<AbortKind, string> = {
      'client-abort': 'the client closed the connection',
      timeout: 'it ran past its time limit',
      signal: 'its AbortSignal fired',
      shutdown: 'the scope is shutting down',
    }
    super(
      'SCOPE_ABORTED',
      `Session '${sessionName}' was aborted because ${why[kind]}${detail ? ` (${detail})` : ''}; ` +
        'its unit of work will be rolled back and it runs no more statements. ' +
        'Fix: stop work when session.signal aborts.',
      options,
    )
    this.kind = kind
  }
}

/** A transaction call that does not fit the session's current transaction state. */
export class TransactionStateError extends ScopedError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('TRANSACTION_STATE', message, options)
  }
}
