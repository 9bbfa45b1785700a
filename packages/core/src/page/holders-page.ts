/**
 * `holdersPage(scope)`: samples the pool in the background and renders the
 * page on demand. No HTTP here: serve `html()` (and `snapshot()` as JSON) from
 * whatever route the application chooses.
 */
import type { Scope } from '../scope.js'
import { type PageSnapshot, type RenderOptions, renderHoldersPage } from './render.js'
import { SampleRing, sampleOf } from './samples.js'

export interface HoldersPageOptions {
  /** How often the pool is sampled for the chart. Default 1 000 ms. */
  sampleEveryMs?: number
  /** How far back the chart goes. Default 300 000 ms (5 minutes). */
  windowMs?: number
}

export interface HoldersPage {
  /** The page's data now: stats, holders, the samples of the window. JSON-safe. */
  snapshot(): PageSnapshot
  /** The page as an HTML string (see `renderHoldersPage`). */
  html(options?: RenderOptions): string
  /** Stop sampling (the timer is unref'd, so it never keeps the process alive anyway). */
  stop(): void
}

function positive(call: string, key: string, v: number): number {
  if (!(Number.isFinite(v) && v > 0)) {
    throw new TypeError(`${call}: { ${key} } must be a finite number of milliseconds > 0, got ${v}`)
  }
  return v
}

/**
 * A live "who holds the connections" page for one scope.
 *
 * @example
 * ```ts
 * import { holdersPage } from '@scoped/core/page'
 *
 * const page = holdersPage(scope)
 * app.get('/scoped', (c) => c.html(page.html()))          // Hono; mount it where only operators reach
 * app.get('/scoped.json', (c) => c.json(page.snapshot()))
 * ```
 */
export function holdersPage(scope: Scope<any>, options: HoldersPageOptions = {}): HoldersPage {
  if (typeof scope !== 'object' || scope === null || typeof scope.holders !== 'function') {
    throw new TypeError(
      `holdersPage(scope): expected a Scope from createScope(), got ${scope === null ? 'null' : typeof scope}`,
    )
  }
  const every = positive(
    'holdersPage(scope, options)',
    'sampleEveryMs',
    options.sampleEveryMs ?? 1_000,
  )
  const windowMs = positive('holdersPage(scope, options)', 'windowMs', options.windowMs ?? 300_000)
  if (windowMs < every) {
    throw new TypeError(
      `holdersPage(scope, { windowMs }): the window (${windowMs} ms) is shorter than one sample (sampleEveryMs: ${every})`,
    )
  }
  const ring = new SampleRing(Math.ceil(windowMs / every))
  const sample = () => ring.push(sampleOf(scope.stats(), Date.now()))
  sample()
  let timer: NodeJS.Timeout | undefined = setInterval(sample, every)
  timer.unref()

  const snapshot = (): PageSnapshot => ({
    scope: scope.name,
    at: Date.now(),
    stats: scope.stats(),
    holders: scope.holders(),
    samples: ring.toArray(),
    windowMs,
    leakDetectionMs: scope.options.leakDetectionMs,
  })
  return {
    snapshot,
    html: (renderOptions) => renderHoldersPage(snapshot(), renderOptions),
    stop() {
      if (timer) clearInterval(timer)
      timer = undefined
    },
  }
}
