/**
 * `node:diagnostics_channel` events, for APM agents and metrics. Publishing
 * costs nothing when nobody subscribes: every call site checks
 * `hasSubscribers` before it builds the message.
 *
 * @example
 * ```ts
 * import diagnostics_channel from 'node:diagnostics_channel'
 * diagnostics_channel.subscribe('scoped:leak', (msg) => alert(msg))
 * ```
 */
import dc from 'node:diagnostics_channel'

export const channels = {
  /** `{ scope, session, waitMs }` after a connection is checked out. */
  acquire: dc.channel('scoped:acquire'),
  /** `{ scope, session, heldMs, destroyed }` after a connection is given back. */
  release: dc.channel('scoped:release'),
  /** `{ scope, session }` after a COMMIT (or a unit of work with nothing to commit). */
  commit: dc.channel('scoped:commit'),
  /** `{ scope, session }` after a ROLLBACK. */
  rollback: dc.channel('scoped:rollback'),
  /** `{ scope, session, holder }` when a connection is held past `leakDetectionMs`. */
  leak: dc.channel('scoped:leak'),
  /** `{ scope, session, error }` when `acquireTimeoutMs` ran out. */
  timeout: dc.channel('scoped:timeout'),
  /** `{ scope, session?, error, during }` for errors nobody else can see (hooks, release, loop). */
  error: dc.channel('scoped:error'),
}
