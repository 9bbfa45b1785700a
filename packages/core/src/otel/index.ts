/**
 * `@scoped/core/otel`: OpenTelemetry metrics for a scope's pool. Needs the
 * optional peer dependency `@opentelemetry/api` (and an SDK to export).
 *
 * @example
 * ```ts
 * import { instrumentScope } from '@scoped/core/otel'
 * const stopMetrics = instrumentScope(scope)
 * ```
 */
export {
  CONNECTION_STATE,
  type InstrumentScopeOptions,
  instrumentScope,
  POOL_NAME,
  SESSION_OUTCOME,
} from './instrument-scope.js'
