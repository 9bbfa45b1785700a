/**
 * Memory over a soak: heap (after a full GC) and RSS sampled every so many
 * requests, and the least-squares slope of each against requests served.
 * A leak of even one small object per request shows as a steady slope; a
 * flat line is what "nothing leaks" looks like from outside.
 */
import v8 from 'node:v8'
import { runInNewContext } from 'node:vm'

// `--expose-gc` for this process only, without changing how vitest starts it.
v8.setFlagsFromString('--expose-gc')
const gc = runInNewContext('gc') as () => void

export interface Sample {
  requests: number
  heapUsed: number
  rss: number
}

export interface MemoryTrend {
  samples: number
  /** Bytes of heap per 1,000 requests (after GC), over the samples after warm-up. */
  heapPerK: number
  /** Bytes of RSS per 1,000 requests, over the same samples. */
  rssPerK: number
  heapFirst: number
  heapLast: number
  rssFirst: number
  rssLast: number
}

export class MemorySampler {
  readonly samples: Sample[] = []

  sample(requests: number): void {
    gc()
    const m = process.memoryUsage()
    this.samples.push({ requests, heapUsed: m.heapUsed, rss: m.rss })
  }

  /** The trend over the samples after the first `warmup` fraction of the run. */
  trend(warmup = 0.2): MemoryTrend {
    const last = this.samples[this.samples.length - 1]?.requests ?? 0
    const s = this.samples.filter((x) => x.requests >= last * warmup)
    const first = s[0]
    const end = s[s.length - 1]
    return {
      samples: s.length,
      heapPerK: slope(s.map((x) => [x.requests / 1000, x.heapUsed])),
      rssPerK: slope(s.map((x) => [x.requests / 1000, x.rss])),
      heapFirst: first?.heapUsed ?? 0,
      heapLast: end?.heapUsed ?? 0,
      rssFirst: first?.rss ?? 0,
      rssLast: end?.rss ?? 0,
    }
  }
}

function slope(points: [number, number][]): number {
  const n = points.length
  if (n < 2) return 0
  const mx = points.reduce((a, [x]) => a + x, 0) / n
  const my = points.reduce((a, [, y]) => a + y, 0) / n
  let num = 0
  let den = 0
  for (const [x, y] of points) {
    num += (x - mx) * (y - my)
    den += (x - mx) ** 2
  }
  return den === 0 ? 0 : num / den
}

const mb = (b: number) => `${(b / 2 ** 20).toFixed(1)} MB`
const kb = (b: number) => `${b >= 0 ? '+' : ''}${(b / 1024).toFixed(1)} KB`

/** `heap +0.3 KB/1k req (41.2 → 41.5 MB), RSS +2.0 KB/1k req (180.1 → 182.0 MB)` */
export function describeTrend(t: MemoryTrend): string {
  return (
    `heap ${kb(t.heapPerK)}/1k req (${mb(t.heapFirst)} → ${mb(t.heapLast)}), ` +
    `RSS ${kb(t.rssPerK)}/1k req (${mb(t.rssFirst)} → ${mb(t.rssLast)})`
  )
}
