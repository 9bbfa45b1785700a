/**
 * The holders page as one self-contained HTML string: no scripts, no external
 * files, so it can be served by any framework (or written to a file) as is.
 */
import type { Holder } from '../holders.js'
import type { ScopeStats } from '../scope.js'
import type { PoolSample } from './samples.js'

/** Everything the page shows, as plain JSON-safe data (serve it as the page's JSON twin). */
export interface PageSnapshot {
  /** The scope's (pool's) name. */
  scope: string
  /** When the snapshot was taken, epoch milliseconds. */
  at: number
  stats: ScopeStats
  /** Sessions holding a connection, longest-held first. */
  holders: Holder[]
  /** The pool over the last `windowMs`, oldest first. */
  samples: PoolSample[]
  windowMs: number
  /** Holders past this are marked as possible leaks (0 = off). */
  leakDetectionMs: number
}

export interface RenderOptions {
  /** Reload the page every this many seconds (`<meta http-equiv="refresh">`). Default 2; 0 = never. */
  refreshSeconds?: number
  /** The page's heading. Default: `Pool '<scope name>'`. */
  title?: string
}

const esc = (v: unknown): string =>
  String(v).replace(
    /[&<>"']/g,
    (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!,
  )

/** `850 ms`, `12.3 s`, `4 min 05 s`: a hold time a person reads at a glance. */
export function formatDuration(ms: number): string {
  if (ms < 1_000) return `${Math.round(ms)} ms`
  if (ms < 60_000) return `${(ms / 1_000).toFixed(1)} s`
  const s = Math.floor(ms / 1_000)
  return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, '0')} s`
}

/** The chart's span as its axis and caption say it: `5 min`, `2 min 13 s`, `12 s`. */
function spanLabel(ms: number): string {
  if (ms >= 60_000 && ms % 60_000 === 0) return `${ms / 60_000} min`
  if (ms >= 1_000 && ms < 60_000) return `${Math.round(ms / 1_000)} s`
  return formatDuration(ms)
}

/** The shortest span the chart draws, so a process's first samples are wide enough to see. */
const MIN_SPAN_MS = 10_000

/**
 * The time the chart starts at: the window's start, or the first sample when sampling began
 * well inside the window (a process that just started). Drawing five minutes of nothing would
 * squeeze its first seconds, the ones someone trying the page looks at, into the last pixels.
 * Once the samples cover nine tenths of the window, the chart is the whole window, so the
 * axis of a running process stays put between reloads.
 */
function chartStart(snap: PageSnapshot): number {
  const { samples, windowMs, at } = snap
  const windowStart = at - windowMs
  const first = samples[0]?.at
  if (first === undefined || first - windowStart <= windowMs / 10) return windowStart
  return Math.max(windowStart, Math.min(first, at - MIN_SPAN_MS))
}

const W = 720
const H = 160
const LEFT = 32
const BOTTOM = 18
const TOP = 6

/** The pool over the window: in use (area), waiting (stacked on top), the size limit (dashed). */
function chart(snap: PageSnapshot): string {
  const { samples, at } = snap
  const from = chartStart(snap)
  const span = at - from
  const plotW = W - LEFT - 4
  const plotH = H - TOP - BOTTOM
  const limit = samples.reduce((m, s) => Math.max(m, s.max ?? 0, s.used + s.waiting), 1)
  // A sample a little older than the window (timers run late under load) is drawn at its left edge.
  const x = (t: number) => (LEFT + Math.max(0, Math.min(1, (t - from) / span)) * plotW).toFixed(1)
  const y = (v: number) => (TOP + plotH - (v / limit) * plotH).toFixed(1)
  const base = y(0)
  let shapes = ''
  if (samples.length > 0) {
    const first = x(samples[0]!.at)
    const last = x(samples[samples.length - 1]!.at)
    const usedLine = samples.map((s) => `${x(s.at)},${y(s.used)}`).join(' ')
    const topLine = samples.map((s) => `${x(s.at)},${y(s.used + s.waiting)}`).join(' ')
    const usedBack = samples
      .slice()
      .reverse()
      .map((s) => `${x(s.at)},${y(s.used)}`)
      .join(' ')
    shapes +=
      `<polygon class="used" points="${first},${base} ${usedLine} ${last},${base}"/>` +
      `<polygon class="waiting" points="${topLine} ${usedBack}"/>`
    const max = samples[samples.length - 1]!.max
    if (max !== undefined) {
      shapes += `<line class="max" x1="${LEFT}" x2="${W - 4}" y1="${y(max)}" y2="${y(max)}"/>`
    }
  }
  const ago = `${spanLabel(span)} ago`
  return (
    `<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="connections in use and waiting over the last ${esc(spanLabel(span))}">` +
    `<line class="axis" x1="${LEFT}" x2="${W - 4}" y1="${base}" y2="${base}"/>` +
    `<text x="${LEFT - 4}" y="${y(limit)}" dy="0.7em" text-anchor="end">${limit}</text>` +
    `<text x="${LEFT - 4}" y="${base}" text-anchor="end">0</text>` +
    shapes +
    `<text x="${LEFT}" y="${H - 4}">${esc(ago)}</text>` +
    `<text x="${W - 4}" y="${H - 4}" text-anchor="end">now</text>` +
    '</svg>'
  )
}

function holderRows(snap: PageSnapshot): string {
  if (snap.holders.length === 0) {
    return '<p class="none">No session holds a connection right now.</p>'
  }
  const rows = snap.holders
    .map((h) => {
      const leak = snap.leakDetectionMs > 0 && h.heldMs >= snap.leakDetectionMs
      const site =
        h.site === undefined
          ? '<span class="dim">(captureStacks is off)</span>'
          : h.stack
            ? `<details><summary><code>${esc(h.site)}</code></summary><pre>${esc(h.stack)}</pre></details>`
            : `<code>${esc(h.site)}</code>`
      return (
        `<tr${leak ? ' class="leak" title="held longer than leakDetectionMs"' : ''}>` +
        `<td>${esc(h.name)}</td>` +
        `<td>${h.requestId === undefined ? '' : `<code>${esc(h.requestId)}</code>`}</td>` +
        `<td class="num">${esc(formatDuration(h.heldMs))}</td>` +
        `<td class="state-${esc(h.state)}">${esc(h.state)}</td>` +
        `<td>${site}</td>` +
        '</tr>'
      )
    })
    .join('')
  return (
    '<table class="holders"><thead><tr><th>Session</th><th>Request</th><th>Held for</th>' +
    `<th>State</th><th>Acquired at</th></tr></thead><tbody>${rows}</tbody></table>`
  )
}

function totals(stats: ScopeStats): string {
  const t = stats.totals
  const cells: [string, number][] = [
    ['acquired', t.acquired],
    ['committed', t.committed],
    ['rolled back', t.rolledBack],
    ['destroyed', t.destroyed],
    ['leaks', t.leaks],
    ['timeouts', t.timeouts],
    ['taken by force', t.forced],
  ]
  return `<dl class="totals">${cells.map(([k, v]) => `<div><dt>${k}</dt><dd>${v}</dd></div>`).join('')}</dl>`
}

const style = `
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#222;max-width:1100px}
h1{font-size:1.3rem;margin:0 0 .3rem}h2{font-size:1rem;margin:1.5rem 0 .5rem}
small,.dim{color:#777;font-weight:normal}code{font-size:12px}
.figures b{font-size:1.2rem}.figures .warn{color:#c40}
svg{width:100%;max-width:${W}px;height:auto;border:1px solid #ddd;background:#fafafa}
svg text{font-size:10px;fill:#666}.axis{stroke:#999}.used{fill:#4a7bd0;opacity:.75}
.waiting{fill:#e8792b;opacity:.8}.max{stroke:#333;stroke-dasharray:4 3}
figcaption{color:#666;font-size:12px}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #eee;vertical-align:top}
.num{text-align:right;white-space:nowrap}tr.leak{background:#fff0e6}.state-querying{color:#2a6}
details pre{font-size:11px;white-space:pre-wrap;margin:.3rem 0}
.totals{display:flex;flex-wrap:wrap;gap:1.5rem;margin:0}.totals dt{color:#777;font-size:12px}.totals dd{margin:0;font-size:1.1rem}
footer{margin-top:2rem;color:#888;font-size:12px}`

/**
 * Render a snapshot as a complete HTML page: the pool over the last minutes,
 * the live holders table (name, request id, held for, state, acquisition site
 * with the stack), the totals. It reloads itself every `refreshSeconds`.
 *
 * @example
 * ```ts
 * import { renderHoldersPage } from '@scoped/core/page'
 * const html = renderHoldersPage(page.snapshot(), { refreshSeconds: 5 })
 * ```
 */
export function renderHoldersPage(snapshot: PageSnapshot, options: RenderOptions = {}): string {
  const refresh = options.refreshSeconds ?? 2
  if (!(Number.isFinite(refresh) && refresh >= 0)) {
    throw new TypeError(
      `renderHoldersPage(snapshot, { refreshSeconds }): expected a number >= 0, got ${refresh}`,
    )
  }
  const { stats } = snapshot
  const last = snapshot.samples[snapshot.samples.length - 1]
  const p = stats.pool
  const used = p ? Math.max(0, p.total - p.idle) : stats.holding
  const waiting = p ? p.waiting : stats.waiting
  const of = p ? ` of ${p.max}` : ''
  const title = options.title ?? `Pool '${snapshot.scope}'`
  const time = new Date(snapshot.at)
    .toISOString()
    .replace('T', ' ')
    .replace(/\.\d+Z$/, ' UTC')
  return (
    '<!doctype html><html lang="en"><head><meta charset="utf-8">' +
    (refresh > 0 ? `<meta http-equiv="refresh" content="${refresh}">` : '') +
    '<meta name="viewport" content="width=device-width, initial-scale=1">' +
    `<title>${esc(`${snapshot.scope}: ${used}${of} in use`)}</title><style>${style}</style></head><body>` +
    `<h1>${esc(title)} <small>driver ${esc(stats.driver)} · ${esc(time)}</small></h1>` +
    `<p class="figures"><b>${used}</b>${of} in use` +
    (p ? ` · ${p.idle} idle` : '') +
    ` · <b${waiting > 0 ? ' class="warn"' : ''}>${waiting}</b> waiting` +
    ` · ${stats.holding} held by this scope's sessions (${stats.inTransaction} in a transaction)` +
    ` · ${stats.open} requests/jobs open</p>` +
    `<figure>${chart(snapshot)}<figcaption>Last ${esc(spanLabel(snapshot.at - chartStart(snapshot)))}` +
    `${last ? '' : ' (no samples yet)'}: connections in use (blue), requests waiting (orange), pool size (dashed).` +
    '</figcaption></figure>' +
    `<h2>Who holds the connections (${snapshot.holders.length})</h2>${holderRows(snapshot)}` +
    `<h2>Since start</h2>${totals(stats)}` +
    `<footer>${refresh > 0 ? `Reloads every ${refresh} s. ` : ''}` +
    'A debug page: it shows routes, request ids and source locations; serve it only to operators.</footer>' +
    '</body></html>'
  )
}
