/**
 * `/metrics` in Prometheus text: the scope's OpenTelemetry metrics
 * (`db.client.connection.*`, `scoped.session.duration`) from
 * `instrumentScope`, read by the OTel Prometheus exporter on each scrape.
 */
import { PrometheusExporter, PrometheusSerializer } from '@opentelemetry/exporter-prometheus'
import { MeterProvider } from '@opentelemetry/sdk-metrics'
import type { Scope } from '@scoped/core'
import { type InstrumentScopeOptions, instrumentScope } from '@scoped/core/otel'

export interface PrometheusMetrics {
  /** The current metrics in the Prometheus text format. */
  scrape(): Promise<string>
  stop(): Promise<void>
}

export function prometheusMetrics(scope: Scope<any>): PrometheusMetrics {
  // No server of its own: the app serves the text on its /metrics route.
  const exporter = new PrometheusExporter({ preventServerStart: true })
  const meterProvider = new MeterProvider({ readers: [exporter] })
  // The cast only bridges two copies of @opentelemetry/api's types in this workspace: the SDK's
  // 2.x line (the last for Node 20) is typed against api 1.9, the core's dev copy is api 1.10.
  const stopInstrumenting = instrumentScope(scope, {
    meterProvider: meterProvider as unknown as InstrumentScopeOptions['meterProvider'],
  })
  const serializer = new PrometheusSerializer()
  return {
    async scrape() {
      const { resourceMetrics } = await exporter.collect()
      return serializer.serialize(resourceMetrics)
    },
    async stop() {
      stopInstrumenting()
      await meterProvider.shutdown()
    },
  }
}
