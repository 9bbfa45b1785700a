/**
 * A fixed-size ring of pool samples: the last few minutes of "how full was the
 * pool", in constant memory however long the process runs.
 */
import type { ScopeStats } from '../scope.js'

/** The pool at one moment. */
export interface PoolSample {
  /** Epoch milliseconds. */
  at: number
  /** Connections checked out (the pool's figure when the driver reports one, else the scope's holders). */
  used: number
  /** Connections open and free (0 when the driver does not report pool figures). */
  idle: number
  /** Requests waiting for a connection. */
  waiting: number
  /** The pool's size limit, when the driver reports it. */
  max: number | undefined
}

/** One sample from a `scope.stats()` result. */
export function sampleOf(stats: ScopeStats, at: number): PoolSample {
  const p = stats.pool
  return p
    ? { at, used: Math.max(0, p.total - p.idle), idle: p.idle, waiting: p.waiting, max: p.max }
    : { at, used: stats.holding, idle: 0, waiting: stats.waiting, max: undefined }
}

export class SampleRing {
  readonly capacity: number
  #items: PoolSample[] = []
  #next = 0

  constructor(capacity: number) {
    this.capacity = capacity
  }

  push(sample: PoolSample): void {
    if (this.#items.length < this.capacity) this.#items.push(sample)
    else this.#items[this.#next] = sample
    this.#next = (this.#next + 1) % this.capacity
  }

  /** Oldest first. */
  toArray(): PoolSample[] {
    if (this.#items.length < this.capacity) return this.#items.slice()
    return [...this.#items.slice(this.#next), ...this.#items.slice(0, this.#next)]
  }
}
