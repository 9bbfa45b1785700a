/**
 * One timer for many deadlines of the same length.
 *
 * Every checkout has an acquire timeout, and every held connection a leak
 * deadline (and, with `maxHoldMs`, a forced release). All deadlines of one
 * kind in a scope have the same length, so they expire in the order they were
 * set: a FIFO list with a single Node timer armed for its head does the job of
 * one `setTimeout`/`clearTimeout` pair per checkout, at the cost of a small
 * object and two pointer updates. At thousands of requests per second that
 * pair was a measurable part of a request's CPU time.
 */

/** A deadline in a {@link Deadlines} list; `cancel()` it when the wait is over. */
export interface Deadline {
  cancel(): void
}

class Entry implements Deadline {
  prev: Entry | undefined
  next: Entry | undefined
  /** False once it fired or was cancelled. */
  live = true

  constructor(
    readonly list: Deadlines,
    readonly at: number,
    readonly fn: () => void,
  ) {}

  cancel(): void {
    if (this.live) this.list.remove(this)
  }
}

export class Deadlines {
  readonly #ms: number
  /** Keep the process alive while a deadline is pending (as a plain `setTimeout` would). */
  readonly #ref: boolean
  #head: Entry | undefined
  #tail: Entry | undefined
  /** Armed for the head's deadline, or an earlier one whose entry is gone (it then re-arms). */
  #timer: NodeJS.Timeout | undefined

  constructor(ms: number, ref: boolean) {
    this.#ms = ms
    this.#ref = ref
  }

  /** Call `fn` in `ms` milliseconds from `now` (a `performance.now()` reading), unless cancelled first. */
  add(now: number, fn: () => void): Deadline {
    const entry = new Entry(this, now + this.#ms, fn)
    const tail = this.#tail
    if (tail) {
      tail.next = entry
      entry.prev = tail
      this.#tail = entry
      return entry
    }
    this.#head = this.#tail = entry
    if (this.#timer === undefined) this.#arm(now)
    else if (this.#ref) this.#timer.ref()
    return entry
  }

  /** @internal */
  remove(entry: Entry): void {
    entry.live = false
    const { prev, next } = entry
    if (prev) prev.next = next
    else this.#head = next
    if (next) next.prev = prev
    else this.#tail = prev
    entry.prev = entry.next = undefined
    // The timer stays armed: it fires for nothing (or early, and re-arms), which costs less
    // than a clearTimeout/setTimeout pair on every checkout. It must not keep the process alive.
    if (this.#head === undefined && this.#ref) this.#timer?.unref()
  }

  #arm(now: number): void {
    const head = this.#head as Entry
    this.#timer = setTimeout(() => this.#fire(), Math.max(1, Math.ceil(head.at - now)))
    if (!this.#ref) this.#timer.unref()
  }

  #fire(): void {
    this.#timer = undefined
    // Node may fire a little before performance.now() reaches the deadline: never run one early.
    const now = performance.now()
    let failed = false
    let failure: unknown
    for (let head = this.#head; head && head.at <= now; head = this.#head) {
      this.remove(head)
      try {
        head.fn()
      } catch (e) {
        // As a throwing setTimeout callback would: uncaught, but only after the others ran.
        if (!failed) failure = e
        failed = true
      }
    }
    if (this.#head && this.#timer === undefined) this.#arm(now)
    if (failed) throw failure
  }
}
