/**
 * `node:diagnostics_channel` events, for APM agents and metrics (the
 * `@scoped/core/otel` instrumentation is built on them).
 *
 * Publishing costs nothing when nobody subscribes: every call site checks
 * `hasSubscribers` before it builds the message, so an application without an
 * APM agent pays one property read per event. Messages are published
 * synchronously, at the moment named on each channel below; a subscriber must
 * not throw and must not block. Do not rely on the async context inside a
 * subscriber (`release` and `close` run after the request's code finished):
 * use `message.session` instead of `getSession()`.
 *
 * Every message carries `scope` (the scope's name, the metrics' pool name) and,
 * except for some `error`s, `session` (its `id`, `name`, `requestId`, `state`).
 * Durations are milliseconds, from `performance.now()`.
 *
 * @example
 * ```ts
 * import diagnostics_channel from 'node:diagnostics_channel'
 * import type { LeakMessage } from '@scoped/core'
 *
 * diagnostics_channel.subscribe('scoped:leak', (m) => {
 *   const { holder } = m as LeakMessage
 *   alert(`${holder.name} (request ${holder.requestId}) has held a connection ${holder.heldMs} ms`)
 * })
 * ```
 */
import dc from 'node:diagnostics_channel'
import type { PoolTimeoutError } from './errors.js'
import type { Holder } from './holders.js'
import type { Session, SessionOutcome } from './session.js'

/** `scoped:acquire` — a session checked a connection out. */
export interface AcquireMessage {
  scope: string
  session: Session
  /** From asking the driver to having the connection (includes the driver's validation). */
  waitMs: number
}

/** `scoped:release` — a session gave its connection back (or had it destroyed). */
export interface ReleaseMessage {
  scope: string
  session: Session
  /** From checkout to release: the connection's use time. */
  heldMs: number
  /** True when the connection is destroyed instead of going back to the pool. */
  destroyed: boolean
  /**
   * How the session's unit of work ended: `committed`, `rolled-back` or
   * `destroyed`. Absent when the session gave the connection back before its
   * end (`release: 'idle'`): it goes on, and may check out again.
   */
  outcome?: SessionOutcome
  /** Why it was destroyed, when there is a reason (connection error, force release). */
  error?: unknown
}

/** `scoped:commit` — a transaction committed. */
export interface CommitMessage {
  scope: string
  session: Session
}

/** `scoped:rollback` — a transaction rolled back. */
export interface RollbackMessage {
  scope: string
  session: Session
  /**
   * What caused it, when an error did: the error thrown inside `transaction(fn)`,
   * a failed COMMIT, or the connection's earlier failure. Absent for a unit of
   * work that ends in rollback (the scope threw, was aborted, `setRollbackOnly()`).
   */
  error?: unknown
}

/** `scoped:leak` — a connection has been held longer than `leakDetectionMs` (published once per checkout). */
export interface LeakMessage {
  scope: string
  session: Session
  /** Who holds it, for how long, in which state, and where it was checked out. */
  holder: Holder
}

/** `scoped:timeout` — a session gave up waiting for a connection after `acquireTimeoutMs`. */
export interface TimeoutMessage {
  scope: string
  session: Session
  /** The error the session is about to throw: its message lists every holder. */
  error: PoolTimeoutError
  waitMs: number
}

/** `scoped:error` — an error nobody else can see: a hook, a release, a loop iteration, a cancel. */
export interface ErrorMessage {
  scope: string
  session?: Session
  error: unknown
  /** What was running: `afterCommit`, `release`, `rollback`, `cancel`, `loop iteration (…)`, … */
  during: string
}

/** `scoped:close` — a session closed (once per session, after its connection was released). */
export interface CloseMessage {
  scope: string
  session: Session
  /**
   * `committed`, `rolled-back`, `destroyed` (its connection was destroyed: it
   * failed, its transaction state was unknown, or it was taken by force), or
   * `empty` (it never checked a connection out).
   */
  outcome: SessionOutcome
  /** From the session's creation (the first `getSession()` of the scope) to its close. */
  durationMs: number
}

export const channels = {
  /** {@link AcquireMessage}, right after a connection is checked out (before BEGIN). */
  acquire: dc.channel('scoped:acquire'),
  /** {@link ReleaseMessage}, right before the connection goes back to the driver. */
  release: dc.channel('scoped:release'),
  /**
   * {@link CommitMessage}, after a successful COMMIT: once per transaction (the unit of
   * work, each explicit `commit()`, each outermost `transaction(fn)`). A unit of work that
   * never began (no statement ran) publishes nothing here; see `scoped:close`.
   */
  commit: dc.channel('scoped:commit'),
  /** {@link RollbackMessage}, after a ROLLBACK: explicit, at the end of the unit of work, or after a failed COMMIT. */
  rollback: dc.channel('scoped:rollback'),
  /** {@link LeakMessage}, when a connection is held past `leakDetectionMs`, after the warning is logged. */
  leak: dc.channel('scoped:leak'),
  /** {@link TimeoutMessage}, when `acquireTimeoutMs` ran out, before the session's checkout rejects. */
  timeout: dc.channel('scoped:timeout'),
  /** {@link ErrorMessage}, before the error goes to `onError` (or the logger). */
  error: dc.channel('scoped:error'),
  /** {@link CloseMessage}, once per session, when it is closed and its connection released. */
  close: dc.channel('scoped:close'),
}
