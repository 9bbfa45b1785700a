/**
 * OpenTelemetry metrics for a scope's pool, with the semantic-convention names
 * (`db.client.connection.*`) that dashboards for HikariCP, SQLAlchemy or
 * .NET pools already chart, plus `scoped.session.duration` by outcome.
 *
 * Gauges are read from `scope.stats()` (the driver's `poolStats()`) when the
 * SDK collects; histograms and the timeout counter are fed from the
 * `node:diagnostics_channel` events, so nothing runs per request beyond what
 * the channels already cost.
 */
import dc from 'node:diagnostics_channel'
import {
  type Attributes,
  type BatchObservableCallback,
  type Meter,
  type MeterProvider,
  metrics,
} from '@opentelemetry/api'
import {
  type AcquireMessage,
  type CloseMessage,
  channels,
  type ReleaseMessage,
  type TimeoutMessage,
} from '../diagnostics.js'
import type { Scope } from '../scope.js'

export interface InstrumentScopeOptions {
  /** Where the instruments are created. Default: a meter named `@scoped/core` of `meterProvider`. */
  meter?: Meter
  /** Default: the global provider (`metrics.getMeterProvider()`), set up by the OTel SDK. */
  meterProvider?: MeterProvider
}

/** Attribute names, as the semantic conventions spell them. */
export const POOL_NAME = 'db.client.connection.pool.name'
export const CONNECTION_STATE = 'db.client.connection.state'
export const SESSION_OUTCOME = 'scoped.session.outcome'

/**
 * Bucket boundaries (seconds) for the time histograms: the ones the semantic
 * conventions advise for `db.client.operation.duration`, so waits and holds
 * line up with query durations on the same dashboard.
 */
const secondsBuckets = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10]

const outcomes = {
  committed: 'committed',
  'rolled-back': 'rolled_back',
  destroyed: 'destroyed',
} as const

/** Names instrumented now, so two scopes with one name cannot silently share (and double) series. */
const instrumented = new Map<string, { scope: Scope<any>; count: number }>()

/**
 * Record the scope's pool metrics with OpenTelemetry until the returned
 * function is called.
 *
 * Instruments (each with `db.client.connection.pool.name` = the scope's name):
 *
 * | name | kind | unit | from |
 * |---|---|---|---|
 * | `db.client.connection.count` (`db.client.connection.state` = `idle`/`used`) | observable up-down counter | `{connection}` | `driver.poolStats()` (`used` only: `stats().holding` without it) |
 * | `db.client.connection.max` | observable up-down counter | `{connection}` | `driver.poolStats().max` |
 * | `db.client.connection.pending_requests` | observable up-down counter | `{request}` | `driver.poolStats().waiting`, else `stats().waiting` |
 * | `db.client.connection.timeouts` | counter | `{timeout}` | `scoped:timeout` |
 * | `db.client.connection.wait_time` | histogram | `s` | `scoped:acquire` (successful checkouts) |
 * | `db.client.connection.use_time` | histogram | `s` | `scoped:release` |
 * | `scoped.session.duration` (`scoped.session.outcome` = `committed`/`rolled_back`/`destroyed`) | histogram | `s` | `scoped:close` (sessions that held a connection) |
 *
 * @example
 * ```ts
 * import { metrics } from '@opentelemetry/api'
 * import { instrumentScope } from '@scoped/core/otel'
 *
 * const scope = createScope({ driver: pgDriver(pool), name: 'main' })
 * const stopMetrics = instrumentScope(scope)            // the global MeterProvider
 * // at shutdown:
 * stopMetrics()
 * await scope.close()
 * ```
 */
export function instrumentScope(
  scope: Scope<any>,
  options: InstrumentScopeOptions = {},
): () => void {
  if (typeof scope !== 'object' || scope === null || typeof scope.stats !== 'function') {
    throw new TypeError(
      `instrumentScope(scope): expected a Scope from createScope(), got ${scope === null ? 'null' : typeof scope}`,
    )
  }
  if (typeof options !== 'object' || options === null) {
    throw new TypeError(
      'instrumentScope(scope, options): options must be an object ({ meter } or { meterProvider })',
    )
  }
  if (options.meter !== undefined && options.meterProvider !== undefined) {
    throw new TypeError(
      'instrumentScope(scope, { meter, meterProvider }): pass one of them, not both',
    )
  }
  const name = scope.name
  const taken = instrumented.get(name)
  if (taken && taken.scope !== scope) {
    throw new Error(
      `instrumentScope(scope): another scope named '${name}' is already instrumented, and metrics tell ` +
        `pools apart by ${POOL_NAME} only, so their series would mix. Fix: give each scope its own ` +
        `name (createScope({ name: 'replica', ... })), or call the first one's disposer before.`,
    )
  }
  instrumented.set(name, { scope, count: (taken?.count ?? 0) + 1 })

  const meter =
    options.meter ?? (options.meterProvider ?? metrics.getMeterProvider()).getMeter('@scoped/core')
  const pool: Attributes = { [POOL_NAME]: name }
  const idle: Attributes = { [POOL_NAME]: name, [CONNECTION_STATE]: 'idle' }
  const used: Attributes = { [POOL_NAME]: name, [CONNECTION_STATE]: 'used' }
  const byOutcome: Record<string, Attributes> = {}
  for (const [ours, theirs] of Object.entries(outcomes)) {
    byOutcome[ours] = { [POOL_NAME]: name, [SESSION_OUTCOME]: theirs }
  }

  const count = meter.createObservableUpDownCounter('db.client.connection.count', {
    description:
      'The number of connections that are currently in the state described by the state attribute.',
    unit: '{connection}',
  })
  const max = meter.createObservableUpDownCounter('db.client.connection.max', {
    description: 'The maximum number of open connections allowed.',
    unit: '{connection}',
  })
  const pending = meter.createObservableUpDownCounter('db.client.connection.pending_requests', {
    description: 'The number of current pending requests for an open connection.',
    unit: '{request}',
  })
  const timeouts = meter.createCounter('db.client.connection.timeouts', {
    description:
      'The number of connection timeouts that have occurred trying to obtain a connection from the pool.',
    unit: '{timeout}',
  })
  const waitTime = meter.createHistogram('db.client.connection.wait_time', {
    description: 'The time it took to obtain an open connection from the pool.',
    unit: 's',
    advice: { explicitBucketBoundaries: secondsBuckets },
  })
  const useTime = meter.createHistogram('db.client.connection.use_time', {
    description: 'The time between borrowing a connection and returning it to the pool.',
    unit: 's',
    advice: { explicitBucketBoundaries: secondsBuckets },
  })
  const sessionDuration = meter.createHistogram('scoped.session.duration', {
    description:
      'The time from a session’s first getSession() to its close, by how its unit of work ended.',
    unit: 's',
    advice: { explicitBucketBoundaries: secondsBuckets },
  })

  const observe: BatchObservableCallback = (result) => {
    const stats = scope.stats()
    const p = stats.pool
    if (p) {
      result.observe(count, Math.max(0, p.total - p.idle), used)
      result.observe(count, p.idle, idle)
      result.observe(max, p.max, pool)
      result.observe(pending, p.waiting, pool)
    } else {
      // A driver without poolStats(): what the scope itself knows (its own checkouts and waiters).
      result.observe(count, stats.holding, used)
      result.observe(pending, stats.waiting, pool)
    }
  }
  meter.addBatchObservableCallback(observe, [count, max, pending])

  // The channels are process-wide: keep only this scope's events.
  const subscriptions: [string, (message: unknown) => void][] = [
    [
      channels.acquire.name as string,
      (m) => {
        const msg = m as AcquireMessage
        if (msg.scope === name) waitTime.record(msg.waitMs / 1000, pool)
      },
    ],
    [
      channels.release.name as string,
      (m) => {
        const msg = m as ReleaseMessage
        if (msg.scope === name) useTime.record(msg.heldMs / 1000, pool)
      },
    ],
    [
      channels.timeout.name as string,
      (m) => {
        if ((m as TimeoutMessage).scope === name) timeouts.add(1, pool)
      },
    ],
    [
      channels.close.name as string,
      (m) => {
        const msg = m as CloseMessage
        // A session that never checked a connection out says nothing about the pool.
        const attrs = msg.scope === name ? byOutcome[msg.outcome] : undefined
        if (attrs) sessionDuration.record(msg.durationMs / 1000, attrs)
      },
    ],
  ]
  for (const [channel, fn] of subscriptions) dc.subscribe(channel, fn)

  let disposed = false
  return () => {
    if (disposed) return
    disposed = true
    for (const [channel, fn] of subscriptions) dc.unsubscribe(channel, fn)
    meter.removeBatchObservableCallback(observe, [count, max, pending])
    const entry = instrumented.get(name)
    if (entry && entry.scope === scope) {
      if (entry.count <= 1) instrumented.delete(name)
      else entry.count--
    }
  }
}
