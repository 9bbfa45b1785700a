/**
 * Medians, spreads and ratios of interleaved rounds, and their markdown form.
 */

export function median(xs: readonly number[]): number {
  if (xs.length === 0) return Number.NaN
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2
}

/** The q-quantile (0..1) by nearest rank. */
export function quantile(xs: readonly number[], q: number): number {
  if (xs.length === 0) return Number.NaN
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!
}

export function mean(xs: readonly number[]): number {
  if (xs.length === 0) return Number.NaN
  let sum = 0
  for (const x of xs) sum += x
  return sum / xs.length
}

/** A number with as many digits as it deserves. */
export function num(x: number, digits?: number): string {
  if (!Number.isFinite(x)) return 'n/a'
  if (digits !== undefined) return x.toFixed(digits)
  const a = Math.abs(x)
  return a >= 1000 ? x.toFixed(0) : a >= 100 ? x.toFixed(0) : a >= 10 ? x.toFixed(1) : x.toFixed(2)
}

/** `median [min–max]` of the rounds. */
export function spread(xs: readonly number[], digits?: number): string {
  if (xs.length === 0) return 'n/a'
  if (xs.length === 1) return num(xs[0]!, digits)
  return `${num(median(xs), digits)} [${num(Math.min(...xs), digits)}–${num(Math.max(...xs), digits)}]`
}

/**
 * The candidate's median over the baseline's median, with the range of the
 * per-round ratios (each round measured both sides back to back).
 */
export function ratio(
  cand: readonly number[],
  base: readonly number[],
): { value: number; text: string } {
  const value = median(cand) / median(base)
  const perRound = cand.map((c, i) => c / base[i]!).filter(Number.isFinite)
  const range =
    perRound.length > 1
      ? ` [${Math.min(...perRound).toFixed(2)}–${Math.max(...perRound).toFixed(2)}]`
      : ''
  return { value, text: `${value.toFixed(3)}${range}` }
}

/** A markdown table. */
export function table(head: string[], rows: string[][], align?: ('l' | 'r')[]): string {
  const sep = head.map((_, i) => ((align?.[i] ?? (i === 0 ? 'l' : 'r')) === 'r' ? '---:' : '---'))
  return [head, sep, ...rows].map((r) => `| ${r.join(' | ')} |`).join('\n')
}
