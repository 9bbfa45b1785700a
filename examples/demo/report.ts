/**
 * Printing: the progress line while traffic runs, and the tables after.
 */
import type { Outcome, Progress } from './traffic.ts'

const isTTY = process.stdout.isTTY === true

export function out(line = ''): void {
  process.stdout.write(`${line}\n`)
}

export function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(1)} s`
}

const outcomeOrder: Outcome[] = [
  '201',
  '200',
  '404',
  '400',
  '500',
  'aborted',
  'gave-up',
  'network-error',
  'not-sent',
]

export function outcomeLabel(o: Outcome): string {
  switch (o) {
    case 'aborted':
      return 'aborted by the client'
    case 'gave-up':
      return 'client gave up (timeout)'
    case 'network-error':
      return 'network error'
    case 'not-sent':
      return 'not sent (time is up)'
    default:
      return o
  }
}

export function outcomes(m: Map<Outcome, number>, sep = ' · '): string {
  const keys = [...m.keys()].sort((a, b) => {
    const ia = outcomeOrder.indexOf(a)
    const ib = outcomeOrder.indexOf(b)
    return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib)
  })
  return keys.map((k) => `${outcomeLabel(k)} ${m.get(k)}`).join(sep)
}

/** A progress printer: one line rewritten in a terminal, a line every 2 s otherwise. */
export function progressPrinter(label: string, pool: () => string): (p: Progress) => void {
  let lastPrinted = -Infinity
  let finished = false
  return (p) => {
    if (finished) return
    const done = p.done === p.total
    const width = 20
    const filled = Math.round((p.done / Math.max(1, p.total)) * width)
    const bar = `${'█'.repeat(filled)}${'░'.repeat(width - filled)}`
    const line =
      `  ${label} ${bar} ${String(p.done).padStart(String(p.total).length)}/${p.total}` +
      ` ${seconds(p.elapsedMs).padStart(6)} │ ${outcomes(p.outcomes, ' ')} │ ${pool()}`
    if (isTTY) {
      process.stdout.write(`\r\x1b[2K${line}${done ? '\n' : ''}`)
    } else if (done || p.elapsedMs - lastPrinted >= 2000) {
      lastPrinted = p.elapsedMs
      out(line)
    }
    if (done) finished = true
  }
}

/** Rows of label/value pairs, aligned. */
export function table(rows: [string, string][], indent = '    '): void {
  const w = Math.max(...rows.map(([k]) => k.length))
  for (const [k, v] of rows) out(`${indent}${k.padEnd(w)}  ${v}`)
}

/** A side-by-side comparison: a header row, then one row per figure. */
export function columns(header: string[], rows: string[][], indent = '  '): void {
  const all = [header, ...rows]
  const widths = header.map((_, i) => Math.max(...all.map((r) => (r[i] ?? '').length)))
  const fmt = (r: string[]) =>
    indent +
    r
      .map((c, i) => c.padEnd(widths[i] ?? 0))
      .join('   ')
      .trimEnd()
  out(fmt(header))
  out(indent + widths.map((w) => '─'.repeat(w)).join('   '))
  for (const r of rows) out(fmt(r))
}
