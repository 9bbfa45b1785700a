/**
 * Global setup of the long run: start with no rows (unless
 * RELIABILITY_KEEP_ROWS=1, to re-run one scenario and keep the others'), and
 * write test/reliability/RESULTS.md from every row when the run ends.
 */
import { clearRows, writeResults } from './report.ts'

export function setup(): void {
  if (process.env.RELIABILITY_KEEP_ROWS !== '1') clearRows('long')
}

export function teardown(): void {
  const file = writeResults('long')
  console.log(`[reliability] results written to ${file}`)
}
