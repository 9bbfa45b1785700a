/**
 * A real OpenTelemetry SDK MeterProvider whose metrics a test collects on
 * demand, and lookups of data points by metric name and attributes.
 */
import {
  type DataPoint,
  type Histogram,
  MeterProvider,
  type MetricData,
  MetricReader,
} from '@opentelemetry/sdk-metrics'

/** A reader that exports nowhere: the test calls `collect()` itself. */
class CollectingReader extends MetricReader {
  protected async onForceFlush(): Promise<void> {}
  protected async onShutdown(): Promise<void> {}
}

export interface Collected {
  metric(name: string): MetricData | undefined
  /** The data point of `name` whose attributes include `attrs`. */
  point<T = number>(name: string, attrs?: Record<string, string>): DataPoint<T> | undefined
  /** A sum's or gauge's value (undefined when there is no such point). */
  value(name: string, attrs?: Record<string, string>): number | undefined
  /** A histogram's point. */
  histogram(name: string, attrs?: Record<string, string>): Histogram | undefined
}

export function testMeterProvider(): { provider: MeterProvider; collect(): Promise<Collected> } {
  const reader = new CollectingReader()
  const provider = new MeterProvider({ readers: [reader] })
  return {
    provider,
    async collect() {
      const { resourceMetrics, errors } = await reader.collect()
      if (errors.length > 0) throw errors[0]
      const all = resourceMetrics.scopeMetrics.flatMap((s) => s.metrics)
      const metric = (name: string) => all.find((m) => m.descriptor.name === name)
      const point = <T>(name: string, attrs: Record<string, string> = {}) =>
        (metric(name)?.dataPoints as DataPoint<T>[] | undefined)?.find((p) =>
          Object.entries(attrs).every(([k, v]) => p.attributes[k] === v),
        )
      return {
        metric,
        point,
        value: (name, attrs) => point<number>(name, attrs)?.value,
        histogram: (name, attrs) => point<Histogram>(name, attrs)?.value,
      }
    },
  }
}
