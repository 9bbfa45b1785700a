/**
 * What every suite gets from the runner, and what it gives back.
 */
import type { PostgresCpu } from './postgres-cpu.ts'

export interface Context {
  quick: boolean
  /** The benchmark database (seeded by bench/apps/schema.ts). */
  url: string
  pgCpu: PostgresCpu | undefined
  /** The machine's Node (the runner's own binary). */
  node20: string
  node24: string | undefined
  /** `vX.Y.Z` of each. */
  node20Version: string
  node24Version: string | undefined
  /** Why there is no Node 24, when there is none. */
  node24Why: string | undefined
  bundles: { http: string; micro: string; alloc: string }
  log: (line: string) => void
}

/** A goal from the brief, met or not, with the figure that decides it. */
export interface Target {
  name: string
  goal: string
  figure: string
  /** undefined: could not be measured (and `figure` says why). */
  met: boolean | undefined
}

export interface SuiteResult {
  /** File name under bench/results/. */
  file: string
  title: string
  markdown: string
  targets: Target[]
}
