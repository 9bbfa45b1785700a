/**
 * The demo's load: a fixed, seeded mix of requests (so both versions of the
 * app get exactly the same traffic), sent over real HTTP with a bounded
 * number in flight, each classified by what the client saw.
 */
import { sampleOrder } from '@examples/shared'

export type Kind = 'create' | 'read' | 'list' | 'fail-halfway' | 'abort' | 'export' | 'invalid'

export interface PlannedRequest {
  kind: Kind
  method: 'GET' | 'POST'
  path: string
  body?: unknown
  /** The client goes away this long after sending (a slow report it stops waiting for). */
  abortAfterMs?: number
}

/** What the client saw: the status, or that it aborted, gave up, or never sent it. */
export type Outcome = `${number}` | 'aborted' | 'gave-up' | 'network-error' | 'not-sent'

/** The mix, in percent. */
export const mix: [Kind, number][] = [
  ['create', 35],
  ['read', 15],
  ['list', 5],
  ['fail-halfway', 15],
  ['abort', 10],
  ['export', 10],
  ['invalid', 10],
]

/** A small deterministic PRNG (mulberry32): the same seed gives the same traffic. */
function random(seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

export function plan(count: number, seed = 2024): PlannedRequest[] {
  const next = random(seed)
  const out: PlannedRequest[] = []
  let creates = 0
  for (let i = 0; i < count; i++) {
    let roll = next() * 100
    let kind: Kind = 'create'
    for (const [k, pct] of mix) {
      if (roll < pct) {
        kind = k
        break
      }
      roll -= pct
    }
    switch (kind) {
      case 'create':
        creates++
        out.push({ kind, method: 'POST', path: '/orders', body: sampleOrder(i) })
        break
      case 'read':
        // Mostly orders that exist by now, some that never will (404).
        out.push({ kind, method: 'GET', path: `/orders/${1 + Math.floor(next() * (creates + 5))}` })
        break
      case 'list':
        out.push({ kind, method: 'GET', path: '/orders?status=new' })
        break
      case 'fail-halfway':
        out.push({
          kind,
          method: 'POST',
          path: '/orders/fail-halfway',
          body: { ...sampleOrder(i), customer: `halfway-${i}` },
        })
        break
      case 'abort':
        out.push({
          kind,
          method: 'GET',
          path: '/orders/summary?slowMs=400',
          abortAfterMs: 40 + Math.floor(next() * 40),
        })
        break
      case 'export':
        out.push({ kind, method: 'GET', path: '/orders/export?limit=200' })
        break
      case 'invalid':
        out.push({ kind, method: 'POST', path: '/orders', body: { customer: '', items: [] } })
        break
    }
  }
  return out
}

export interface TrafficOptions {
  /** Requests in flight at once. */
  concurrency: number
  /** The client gives up on a request after this long. */
  timeoutMs: number
  /** Stop sending new requests after this long (the rest are 'not-sent'). */
  deadlineMs?: number
  /** Called about every 250 ms and at the end. */
  onProgress?: (p: Progress) => void
}

export interface Progress {
  done: number
  total: number
  outcomes: Map<Outcome, number>
  elapsedMs: number
}

export interface TrafficResult extends Progress {
  /** Outcome counts per kind of request. */
  byKind: Map<Kind, Map<Outcome, number>>
}

function bump<K>(m: Map<K, number>, k: K, n = 1): void {
  m.set(k, (m.get(k) ?? 0) + n)
}

async function send(base: string, r: PlannedRequest, timeoutMs: number): Promise<Outcome> {
  const controller = new AbortController()
  let why: 'aborted' | 'gave-up' | undefined
  const timers = [
    setTimeout(() => {
      why = 'gave-up'
      controller.abort()
    }, timeoutMs),
  ]
  if (r.abortAfterMs !== undefined) {
    timers.push(
      setTimeout(() => {
        why ??= 'aborted'
        controller.abort()
      }, r.abortAfterMs),
    )
  }
  try {
    const res = await fetch(base + r.path, {
      method: r.method,
      signal: controller.signal,
      ...(r.body !== undefined && {
        body: JSON.stringify(r.body),
        headers: { 'content-type': 'application/json' },
      }),
    })
    await res.arrayBuffer() // the whole body: a streamed export counts once it has ended
    return `${res.status}`
  } catch {
    return why ?? 'network-error'
  } finally {
    for (const t of timers) clearTimeout(t)
  }
}

/** Send `requests` to `base` and count what came back. */
export async function drive(
  base: string,
  requests: PlannedRequest[],
  opts: TrafficOptions,
): Promise<TrafficResult> {
  const start = performance.now()
  const outcomes = new Map<Outcome, number>()
  const byKind = new Map<Kind, Map<Outcome, number>>()
  let next = 0
  let done = 0
  const progress = (): Progress => ({
    done,
    total: requests.length,
    outcomes,
    elapsedMs: performance.now() - start,
  })
  const ticker = opts.onProgress ? setInterval(() => opts.onProgress?.(progress()), 250) : undefined
  const record = (r: PlannedRequest, o: Outcome) => {
    bump(outcomes, o)
    const k = byKind.get(r.kind) ?? new Map<Outcome, number>()
    byKind.set(r.kind, k)
    bump(k, o)
    done++
  }
  const lane = async () => {
    for (;;) {
      const i = next++
      const r = requests[i]
      if (!r) return
      if (opts.deadlineMs !== undefined && performance.now() - start > opts.deadlineMs) {
        record(r, 'not-sent')
        continue
      }
      record(r, await send(base, r, opts.timeoutMs))
    }
  }
  await Promise.all(Array.from({ length: opts.concurrency }, lane))
  clearInterval(ticker)
  const result = { ...progress(), byKind }
  opts.onProgress?.(result)
  return result
}
