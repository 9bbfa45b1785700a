/**
 * The Session: one unit of work on at most one pooled connection.
 *
 * The lifecycle is one explicit state machine. Phases and the transitions
 * between them (every one is named, and `#to` refuses any other):
 *
 *   idle ──acquire──▶ acquiring ──acquired──▶ holding
 *     ▲  ▲               │                       │
 *     │  └──acquireFailed┘                       │
 *     └───────idleRelease (release: 'idle')──────┘
 *   idle / holding ──close──▶ closing ──released──▶ closed
 *   holding ──forceRelease (maxHoldMs, shutdown)──▶ closed
 *
 * Transaction state lives beside the phase: a stack of transaction frames,
 * empty when no transaction is open. Frame 0 is the real transaction (BEGIN),
 * frames above it are savepoints.
 */

import type { Deadline } from './deadlines.js'
import { channels } from './diagnostics.js'
import type { TxOptions } from './driver.js'
import {
  ScopeClosedError,
  ScopedError,
  SessionClosedError,
  TransactionStateError,
} from './errors.js'
import { callSite, captureStack, type Holder, userFrames } from './holders.js'
import type { OpenScope as Frame, ScopeCore } from './scope.js'

export type SessionState = 'idle' | 'active' | 'closed'
export type TransactionMode = 'auto' | 'none'
/** When a session gives its connection back: at the scope's end, or whenever it is idle. */
export type ReleaseMode = 'end' | 'idle'
export type Hook = () => void | Promise<void>

/** How a closed session ended. `empty`: it never held a connection and had nothing to do. */
export type SessionOutcome = 'committed' | 'rolled-back' | 'destroyed' | 'empty'

type Phase = 'idle' | 'acquiring' | 'holding' | 'closing' | 'closed'

const transitions: Record<string, [from: Phase[], to: Phase]> = {
  acquire: [['idle'], 'acquiring'],
  acquired: [['acquiring'], 'holding'],
  acquireFailed: [['acquiring'], 'idle'],
  idleRelease: [['holding'], 'idle'],
  close: [['idle', 'acquiring', 'holding'], 'closing'],
  released: [['closing'], 'closed'],
  forceRelease: [['holding', 'closing'], 'closed'],
}
type Transition = keyof typeof transitions

interface TxFrame {
  /** undefined for the real transaction, the savepoint's name above it. */
  savepoint: string | undefined
  /** Opened by `transaction(fn)` (its end is fn's end), not by the unit of work. */
  explicit: boolean
  /**
   * Opened by `transactionAround()`: its statements and nested transactions come
   * from outside fn (Kysely's begin … commit), so one started beside it cannot be
   * told from one inside it.
   */
  around: boolean
  /** `noHooks` until a hook is registered (most units of work register none). */
  afterCommit: Hook[]
  afterRollback: Hook[]
}

/** Shared by every frame without hooks; frozen, so a push to it would fail loudly. */
const noHooks: Hook[] = Object.freeze([]) as unknown as Hook[]

function addHooks(frame: TxFrame, kind: 'afterCommit' | 'afterRollback', hooks: Hook[]): void {
  if (hooks.length === 0) return
  if (frame[kind] === noHooks) frame[kind] = [...hooks]
  else frame[kind].push(...hooks)
}

let nextId = 0

/**
 * A request's or job's database session. Get it with `getSession()`; it checks
 * a connection out lazily, on the first `connection()` or `use()`.
 *
 * @example
 * ```ts
 * const rows = await getSession().use((client) => client.query('SELECT 1'))
 * ```
 */
export class Session<C = unknown> {
  readonly requestId: string | undefined
  /** `id` and `name` are made when first read: a session that only runs statements needs neither. */
  #seq: number
  #id: string | undefined
  #name: string | undefined

  #core: ScopeCore<C>
  #frame: Frame<C>
  #mode: TransactionMode
  /** `release: 'idle'`: the connection goes back whenever no work uses it (autocommit only). */
  #releaseIdle: boolean
  /** `connection()` handed the connection out untracked: it stays until the end. */
  #pinned = false
  /** A connection was held (and given back) before the current one, if any. */
  #heldBefore = false
  /** A connection given back earlier was destroyed (for the session's outcome). */
  #destroyedBefore = false
  #phase: Phase = 'idle'
  #conn: C | undefined
  /** The shared promise of "connection checked out and, in 'auto' mode, BEGIN sent". */
  #ready: Promise<C> | undefined
  /** `#ready`'s connection once it resolved (while `#ready` is still that promise). */
  #readyConn: C | undefined
  /** use() calls waiting for the connection (checkout, BEGIN): later uses queue behind them. */
  #waiting = 0
  /**
   * The checkout in flight as a promise, for whoever joins it after the party that
   * started it (concurrent first uses never check out twice). Made only when someone joins.
   */
  #acquiring: Promise<C> | undefined
  #joinResolve: ((conn: C) => void) | undefined
  #joinReject: ((e: unknown) => void) | undefined
  /**
   * The unit of work's BEGIN while it is on the wire unanswered, when the driver
   * pipelines (`driver.pipelined(conn)`): statements were sent behind it without
   * waiting, so their errors are weighed against its outcome.
   */
  #began: Promise<void> | undefined
  /** close() was called: no new work is accepted, even before the phase moves on. */
  #closeRequested = false
  #tx: TxFrame[] = []
  /** Hooks registered in 'auto' mode before the unit of work's BEGIN. */
  #pending: TxFrame | undefined
  #rollbackOnly = false
  #savepoints = 0
  /** Tracked work in flight (use() and transaction()); close() waits for it. */
  #inFlight = 0
  /** use() calls in flight: the `querying` state of holders. */
  #running = 0
  #drained: (() => void) | undefined
  #heldSince = 0
  /** Captured at checkout; V8 formats `.stack` only when read, so holding the Error is cheap. */
  #acquireSite: Error | undefined
  /** The first checkout's site (`release: 'idle'` checks out again): for SessionClosedError. */
  #firstSite: Error | undefined
  /** A connection-level error seen on this connection: it will be destroyed. */
  #broken: unknown
  /** COMMIT/ROLLBACK failed: the transaction state is unknown, destroy on release. */
  #dirty = false
  /** Leak warning and forced release (maxHoldMs) while a connection is held, when enabled. */
  #leakDeadline: Deadline | undefined
  #holdDeadline: Deadline | undefined
  #closing: Promise<SessionOutcome> | undefined
  /** Closed by closeNow(): `#closing` is made only if someone asks for it. */
  #closedNow = false
  #outcome: SessionOutcome | undefined
  #closedHow = ''
  #forced = false
  /** The transaction's COMMIT or ROLLBACK is on the wire (its frames are already gone). */
  #ending = false
  /** Taken by force while the end's COMMIT was on the wire, which then succeeded. */
  #committedAnyway = false
  #closedAt: Error | undefined
  /** For the `scoped:close` event's duration. */
  #createdAt = performance.now()

  /** @internal Sessions are made by their scope; use `getSession()`. */
  constructor(core: ScopeCore<C>, frame: Frame<C>, mode: TransactionMode, releaseIdle = false) {
    this.#core = core
    this.#frame = frame
    this.#mode = mode
    this.#releaseIdle = releaseIdle
    this.requestId = frame.requestId
    this.#seq = ++nextId
  }

  /** Unique in the process (prefixed when there are several scopes): `holders()`, events, errors. */
  get id(): string {
    this.#id ??= `${this.#core.idPrefix}${this.#seq.toString(36)}`
    return this.#id
  }

  /** The request's or job's name, e.g. `GET /orders/:id` (an adapter may work it out only now). */
  get name(): string {
    this.#name ??= this.#frame.name
    return this.#name
  }

  /** `idle`: no connection held; `active`: holding one; `closed`: ended, every call throws. */
  get state(): SessionState {
    if (this.#phase === 'closed') return 'closed'
    return this.#conn === undefined ? 'idle' : 'active'
  }

  /** True once a transaction (BEGIN) is open on the connection, until its COMMIT or ROLLBACK is answered. */
  get inTransaction(): boolean {
    return this.#tx.length > 0 || this.#ending
  }

  /** @internal close() was called (it may still wait for running work), or it is closed. */
  get closeRequested(): boolean {
    return this.#closeRequested || this.#phase === 'closed'
  }

  /** @internal True inside transaction(fn) (or a savepoint), where close() would wait for itself. */
  get inExplicitTransaction(): boolean {
    return this.#tx.some((f) => f.explicit)
  }

  /** @internal `release: 'idle'`: the connection goes back whenever nothing uses it. */
  get releasesWhenIdle(): boolean {
    return this.#releaseIdle
  }

  /**
   * @internal Count the caller as work in progress until it calls the returned
   * function: with `release: 'idle'` the connection is not given back
   * meanwhile, and `close()` waits for it. For a driver's handle that runs
   * several statements that must share one connection (Kysely's
   * `db.connection()`, its transactions). Checks nothing out by itself.
   */
  retain(): () => void {
    const err = this.#unusable('connection()')
    if (err) throw err
    this.#inFlight++
    let done = false
    return () => {
      if (done) return
      done = true
      this.#settle()
    }
  }

  /** True when the connection was taken by force (maxHoldMs, shutdown timeout). */
  get forced(): boolean {
    return this.#forced
  }

  /**
   * @internal True when the connection was taken by force before the unit of
   * work committed: false when its COMMIT succeeded anyway (the force came
   * while the COMMIT was on the wire, or while afterCommit hooks ran).
   */
  get lostUnit(): boolean {
    return this.#forced && !this.#committedAnyway
  }

  /** Why the session is closed, in words (for messages), once it is. */
  get closedReason(): string {
    return this.#closedHow
  }

  /** How a closed session ended, once it is closed. */
  get outcome(): SessionOutcome | undefined {
    return this.#outcome
  }

  /** Aborted when the request or job is aborted (client gone, timeout, signal, shutdown). */
  get signal(): AbortSignal {
    return this.#frame.signal
  }

  /**
   * The session's connection, checked out on first call (and, in 'auto' mode,
   * inside a BEGIN). Concurrent first calls share one checkout. The use is not
   * tracked: prefer `use()`, which `close()` waits for.
   */
  connection(): Promise<C> {
    const err = this.#unusable('connection()')
    if (err) return Promise.reject(err)
    // Untracked: nobody can tell when it is done with, so `release: 'idle'` keeps it to the end.
    this.#pinned = true
    return this.#ready ?? this.#prepare()
  }

  /**
   * Run `fn` with the session's connection, as a tracked use: the session is not
   * closed (and the connection not released) while `fn` runs.
   *
   * @example
   * ```ts
   * const { rows } = await getSession().use((c) => c.query('SELECT * FROM orders WHERE id = $1', [id]))
   * ```
   */
  // Not an async function, and `fn` is called at once when the connection is at hand: on
  // Node 20 every promise and every await costs an AsyncLocalStorage hook's fields, and a
  // statement is the commonest call there is.
  use<T>(fn: (conn: C) => Promise<T>): Promise<T> {
    // Checked before the checkout: a wrong argument must not cost a connection.
    if (typeof fn !== 'function') {
      return Promise.reject(
        new TypeError(
          `use(fn): fn must be a function that receives the connection, got ${typeof fn}`,
        ),
      )
    }
    const err = this.#unusable('use()')
    if (err) return Promise.reject(err)
    this.#inFlight++
    this.#running++
    const conn = this.#connNow()
    if (conn !== undefined) return this.#useWith(fn, conn)
    // Uses waiting for the connection go first: a later use must not overtake them.
    this.#waiting++
    if (this.#mode === 'none' && this.#phase === 'idle' && this.#ready === undefined) {
      // The first statement: check out and run `fn` in the checkout's own reaction, one
      // promise for the whole use (no cached "ready" to wait on in autocommit).
      return new Promise<T>((resolve, reject) => {
        this.#startCheckout(
          (c) => {
            this.#waiting--
            this.#useInto(fn, c, resolve, reject)
          },
          (e) => {
            this.#waiting--
            this.#useEnded()
            reject(e)
          },
        )
      })
    }
    return (this.#ready ?? this.#prepare()).then(
      (c) => {
        this.#waiting--
        return this.#useWith(fn, c)
      },
      (e: unknown) => {
        this.#waiting--
        // A BEGIN that failed, maybe because maxHoldMs or a shutdown took the connection under it.
        this.#useEndedWith(e)
      },
    )
  }

  /** `fn` on the connection now; the use ends when its promise settles. */
  #useWith<T>(fn: (conn: C) => Promise<T>, conn: C): Promise<T> {
    return called(fn, conn).then(
      (result) => {
        if (!this.#began) {
          this.#useEnded()
          return result
        }
        return this.#afterBegan(() => {
          this.#useEnded()
          return result
        })
      },
      // After a pipelined BEGIN that failed, the statement's own error is only its consequence
      // ("current transaction is aborted"): the BEGIN's error is reported instead.
      (e: unknown) =>
        this.#began ? this.#afterBegan(() => this.#useFailed(conn, e)) : this.#useFailed(conn, e),
    )
  }

  /**
   * `#useWith` settling a promise of the caller's (the first statement's checkout):
   * autocommit only, where no pipelined BEGIN can be pending.
   */
  #useInto<T>(
    fn: (conn: C) => Promise<T>,
    conn: C,
    resolve: (r: T) => void,
    reject: (e: unknown) => void,
  ): void {
    called(fn, conn).then(
      (result) => {
        this.#useEnded()
        resolve(result)
      },
      (e: unknown) => {
        try {
          this.#useFailed(conn, e)
        } catch (err) {
          reject(err)
        }
      },
    )
  }

  /** `onBegan` once a pipelined BEGIN is answered; if it failed, the use ends with its error. */
  #afterBegan<T>(onBegan: () => T): Promise<T> {
    return this.#beganOrThrow().then(onBegan, (e: unknown) => this.#useEndedWith(e))
  }

  /** The use's statement failed: note a broken connection, say who took a forced one. */
  #useFailed(conn: C, e: unknown): never {
    this.#noteError(conn, e)
    this.#useEndedWith(e)
  }

  /**
   * The use ends with `e`. Taken by force under it, the driver only says
   * "Connection terminated": say who took it and why (maxHoldMs, shutdown),
   * keeping the driver's error as the cause.
   */
  #useEndedWith(e: unknown): never {
    const error = this.#forced ? this.#takenError(e, 'use()') : e
    this.#useEnded()
    throw error
  }

  #useEnded(): void {
    this.#running--
    this.#settle()
  }

  /**
   * Run `fn` in a transaction. Outermost: BEGIN … COMMIT (ROLLBACK if `fn`
   * throws), re-run on retryable errors when `retry` is set. Nested: a
   * SAVEPOINT, rolled back to (and the error rethrown) if `fn` throws;
   * `afterCommit` hooks registered inside a rolled-back savepoint are dropped.
   *
   * @example
   * ```ts
   * await getSession().transaction(async () => { await debit(); await credit() },
   *   { isolation: 'serializable', retry: { attempts: 3 } })
   * ```
   */
  transaction<T>(fn: () => Promise<T>, opts: TxOptions = {}): Promise<T> {
    return this.#transaction(fn, opts, false)
  }

  /**
   * @internal `transaction(fn)` for a driver whose transaction API begins and
   * ends in separate calls (Kysely's begin … commit): fn only waits for the
   * end, and the transaction's statements come from elsewhere. Nested and
   * concurrent transactions then cannot be told apart (see `#nested`).
   */
  transactionAround<T>(fn: () => Promise<T>, opts: TxOptions = {}): Promise<T> {
    return this.#transaction(fn, opts, true)
  }

  async #transaction<T>(fn: () => Promise<T>, opts: TxOptions, around: boolean): Promise<T> {
    if (typeof fn !== 'function') {
      throw new TypeError(`transaction(fn): fn must be a function, got ${typeof fn}`)
    }
    const err = this.#unusable('transaction()')
    if (err) throw err
    validateTxOptions(opts)
    this.#inFlight++
    try {
      if (this.#tx.length > 0) return await this.#nested(fn, opts, around)
      return await this.#outermost(fn, opts, around)
    } finally {
      this.#settle()
    }
  }

  /**
   * Commit the open transaction now. In 'auto' mode the next statement begins
   * a new one. Inside `transaction(fn)`, return from `fn` instead.
   */
  async commit(): Promise<void> {
    const err = this.#unusable('commit()')
    if (err) throw err
    const root = this.#tx[0]
    if (this.#tx.length > 1 || root?.explicit) {
      throw new TransactionStateError(
        `commit() on session '${this.name}' inside transaction(fn): the transaction ends when fn returns. Fix: return from fn instead of calling commit().`,
      )
    }
    if (this.#rollbackOnly || this.#frame.aborted) {
      const why = this.#frame.aborted ? this.#frame.aborted.message : 'setRollbackOnly() was called'
      await this.#endTransaction(false)
      throw new TransactionStateError(
        `commit() on session '${this.name}' rolled back instead: the unit of work is rollback-only (${why}).`,
      )
    }
    await this.#endTransaction(true)
  }

  /** Roll the open transaction back now. In 'auto' mode the next statement begins a new one. */
  async rollback(): Promise<void> {
    const err = this.#unusable('rollback()')
    if (err) throw err
    if (this.#tx.length > 1 || this.#tx[0]?.explicit) {
      throw new TransactionStateError(
        `rollback() on session '${this.name}' inside transaction(fn): the transaction ends when fn returns. Fix: throw from fn to roll it back.`,
      )
    }
    await this.#endTransaction(false)
  }

  /** Run `fn` after the enclosing transaction really commits (never if it, or its savepoint, rolls back). */
  afterCommit(fn: Hook): void {
    this.#hook('afterCommit', fn)
  }

  /** Run `fn` after the enclosing transaction (or savepoint) rolls back. */
  afterRollback(fn: Hook): void {
    this.#hook('afterRollback', fn)
  }

  /** The unit of work will roll back at its end, whatever happens; an explicit commit() throws. */
  setRollbackOnly(): void {
    const err = this.#unusable('setRollbackOnly()')
    if (err) throw err
    this.#rollbackOnly = true
  }

  /**
   * End the session: wait for tracked uses, COMMIT (when `commit` is true and
   * nothing marked it rollback-only) or ROLLBACK, run hooks, release the
   * connection. Runs once; later calls return the same promise. Scopes and
   * adapters call this; in application code use `remove()`.
   */
  close(opts: { commit?: boolean } = {}): Promise<SessionOutcome> {
    if (this.#closing) return this.#closing
    if (this.#closedNow) {
      this.#closing = Promise.resolve(this.#outcome!)
      return this.#closing
    }
    const commit = opts.commit ?? true
    const outcome = this.closeNow(commit)
    if (outcome !== undefined) {
      this.#closing = Promise.resolve(outcome)
      return this.#closing
    }
    this.#closeRequested = true
    this.#closing = this.#close(commit)
    return this.#closing
  }

  /**
   * @internal `close()` at once, when there is nothing to wait for: no tracked
   * use running, no transaction to end, no hooks to run. Returns the outcome,
   * or undefined (and does nothing) when the caller must await `close()`. A
   * scope that never queried, or ran autocommit statements only, ends without
   * a promise of its own.
   */
  closeNow(commit: boolean): SessionOutcome | undefined {
    if (this.#closing || this.#closedNow) return undefined
    if (this.#inFlight > 0 || this.#tx.length > 0 || this.#began || this.#pending) return undefined
    this.#closeRequested = true
    this.#closedNow = true
    this.#clearTimers()
    if (this.#phase === 'closed') return this.#outcome! // force-released earlier
    const conn = this.#conn
    const wantCommit = this.#startClose(commit)
    return this.#finishClose(conn, wantCommit, undefined)
  }

  /** @internal A holder row for `scope.holders()`, or undefined when no connection is held. */
  holder(now: number): Holder | undefined {
    if (this.#conn === undefined || this.#phase === 'closed') return undefined
    const raw = this.#acquireSite?.stack
    const stack = userFrames(raw)
    return {
      id: this.id,
      name: this.name,
      ...(this.requestId !== undefined && { requestId: this.requestId }),
      heldMs: Math.round(now - this.#heldSince),
      state: this.#running > 0 ? 'querying' : this.inTransaction ? 'in-transaction' : 'idle',
      ...(stack !== undefined && { site: callSite(raw), stack }),
    }
  }

  /** @internal The frame was aborted: stop waiting for a connection, cancel the statement if asked. */
  onAbort(cancel: boolean): void {
    if (cancel && this.#conn !== undefined && this.#running > 0) {
      const conn = this.#conn
      const send = () => {
        // The statement may have ended meanwhile; then there is nothing left to cancel.
        if (this.#conn !== conn || this.#running === 0) return
        this.#core.driver.cancel?.(conn).catch((e) => this.#core.report(e, 'cancel', this))
      }
      // A pipelined BEGIN still on the wire must not be what the cancel hits: a cancelled BEGIN
      // opens no transaction, and the statement sent behind it would then run in autocommit.
      // Cancel once BEGIN is answered: the statement runs inside the transaction by then.
      if (this.#began) this.#began.then(send, send)
      else send()
    }
  }

  /**
   * @internal Take the connection away now and destroy it (maxHoldMs,
   * shutdown timeout), even under running work. The session is closed.
   */
  forceRelease(reason: string): void {
    if (this.#phase !== 'holding' && this.#phase !== 'closing') return
    const conn = this.#conn as C
    this.#closedHow = reason
    this.#forced = true
    // No stack: it would show the timer that fired, never the user's code (the reason says why).
    this.#to('forceRelease')
    this.#outcome = 'destroyed'
    this.#rejectHooks()
    // Destroying the socket does not stop the server: a backend busy in a statement runs it to
    // the end (holding its locks) before it notices. Cancel it too; harmless if it is idle.
    this.#core.driver.cancel?.(conn).catch((e) => this.#core.report(e, 'cancel', this))
    this.#finishRelease(conn, true, new Error(reason))
    this.#publishClose()
    this.#drained?.()
  }

  // ── transitions ────────────────────────────────────────────────────────

  #to(t: Transition): void {
    const [from, to] = transitions[t]!
    if (!from.includes(this.#phase)) {
      throw new TransactionStateError(
        `Session '${this.name}' cannot ${t} while ${this.#phase} (internal state error; please report it).`,
      )
    }
    this.#phase = to
  }

  #prepare(): Promise<C> {
    if (this.#mode === 'auto') return this.#setReady(this.#openUnit())
    // 'none' needs no cached `ready`: the checkout itself is shared by concurrent first uses,
    // and a held connection is at hand. One promise less on every first statement.
    return this.#checkout()
  }

  /** Checkout, then (unless a transaction was opened meanwhile) the unit of work's BEGIN. */
  #openUnit(): Promise<C> {
    // A chain, not an async function: one promise less for every unit of work on Node 20.
    const conn = this.#conn
    if (conn === undefined) return this.#checkout().then((c) => this.#beginUnit(c))
    let begun: C | Promise<C>
    try {
      begun = this.#beginUnit(conn)
    } catch (e) {
      // A driver's pipelined() that throws: a rejection like any failed BEGIN, never a throw.
      return Promise.reject(e)
    }
    return begun === conn ? Promise.resolve(conn) : (begun as Promise<C>)
  }

  /** The unit of work's BEGIN on `conn`: the connection at once when pipelined, else once BEGIN is answered. */
  #beginUnit(conn: C): C | Promise<C> {
    if (this.#tx.length > 0) return this.#conn as C
    if (this.#core.driver.pipelined?.(conn)) {
      this.#pipelineBegin(conn)
      return conn
    }
    return this.#begin({}, false, () => this.#connAfterBegin())
  }

  /**
   * The connection a BEGIN just answered on, for those who waited on it; a
   * SessionClosedError when it was taken meanwhile (maxHoldMs, a shutdown):
   * nobody's `fn` may run for a closed session.
   */
  #connAfterBegin(): C {
    const conn = this.#conn
    if (conn === undefined || this.#phase === 'closed') throw this.#closedError('use()')
    return conn
  }

  /**
   * Send the unit of work's BEGIN and hand the connection out at once: the first
   * statement goes on the wire right behind it, saving a round trip. Only the
   * unit's plain BEGIN (no isolation or read-only option, which could fail before
   * a transaction opens) is pipelined; whatever runs behind it learns its outcome
   * (use(), savepoints, COMMIT wait for it).
   */
  #pipelineBegin(conn: C): void {
    const began = this.#begin({}, false)
    this.#began = began
    began.then(
      () => {
        if (this.#began === began) this.#began = undefined
      },
      () => {
        // #begin() already took the transaction frame down; the next statement begins again,
        // as it would after a BEGIN that failed before anything was sent behind it.
        if (this.#conn === conn && this.#tx.length === 0) this.#ready = undefined
      },
    )
  }

  /** Wait for a pipelined BEGIN; throw its error if it failed. */
  async #beganOrThrow(): Promise<void> {
    const began = this.#began
    if (!began) return
    await began
    if (this.#began === began) this.#began = undefined
  }

  /** Cache `ready` for concurrent callers; a failed one is not cached, so the next call tries again. */
  #setReady(ready: Promise<C>): Promise<C> {
    this.#ready = ready
    this.#readyConn = undefined
    ready.then(
      (conn) => {
        if (this.#ready === ready) this.#readyConn = conn
      },
      () => {
        if (this.#ready === ready) this.#ready = undefined
      },
    )
    return ready
  }

  /**
   * The connection when a statement may go out on it now, without waiting: held,
   * nothing being set up on it (a checkout, a BEGIN not yet sent), no earlier use
   * still waiting for it. Otherwise undefined: wait for `#ready`/`#prepare()`.
   */
  #connNow(): C | undefined {
    if (this.#waiting > 0) return undefined
    if (this.#ready !== undefined) return this.#readyConn
    // No unit of work to open: in 'none' mode a held connection is ready as it is.
    return this.#mode === 'none' && this.#phase === 'holding' ? this.#conn : undefined
  }

  /** The held connection, or the one checkout in flight (shared by concurrent first uses). */
  #checkout(): Promise<C> {
    if (this.#conn !== undefined) return Promise.resolve(this.#conn)
    if (this.#phase === 'acquiring') {
      this.#acquiring ??= new Promise<C>((resolve, reject) => {
        this.#joinResolve = resolve
        this.#joinReject = reject
      })
      return this.#acquiring
    }
    return new Promise<C>((resolve, reject) => this.#startCheckout(resolve, reject))
  }

  /** Start a checkout for `onConn`/`onFail`; whoever comes while it runs joins it (`#checkout`). */
  #startCheckout(onConn: (conn: C) => void, onFail: (e: unknown) => void): void {
    const core = this.#core
    if (core.ended) {
      onFail(new ScopeClosedError(core.name, `Session '${this.name}' checkout`))
      return
    }
    // Asked for nothing: the driver is not called for a frame that is already over.
    if (this.#frame.aborted) {
      onFail(this.#frame.aborted)
      return
    }
    // Captured synchronously, while the caller's frames are still on the stack.
    if (core.options.captureStacks) {
      this.#acquireSite = captureStack('acquired here')
      this.#firstSite ??= this.#acquireSite
    }
    this.#to('acquire')
    this.#acquire(performance.now(), onConn, onFail)
  }

  /**
   * The driver's checkout, raced against the acquire timeout and the frame's
   * abort. Either one stops the wait at once; a connection the driver delivers
   * after that goes straight back, never leaked. When `onConn` is called the
   * connection is the session's (phase, deadlines, stats); whoever joined the
   * checkout meanwhile learns the outcome after the party that started it.
   * Callbacks, not a promise of its own: each promise costs more on Node 20
   * once an AsyncLocalStorage is active. The driver's signal comes from a free
   * list (see `ScopeCore.signal`): making an AbortSignal per checkout was the
   * costliest step of a request on Node 20.
   */
  #acquire(started: number, onConn: (conn: C) => void, onFail: (e: unknown) => void): void {
    const core = this.#core
    const frame = this.#frame
    const ac = core.signal()
    core.waiting++
    let done = false
    const stop = () => {
      done = true
      deadline.cancel()
      frame.removeAbortWaiter(onFrameAbort)
      core.waiting--
    }
    const fail = (reason: unknown) => {
      if (this.#phase === 'acquiring') this.#to('acquireFailed')
      const join = this.#joinReject
      this.#unjoin()
      onFail(reason)
      join?.(reason)
    }
    const giveUp = (reason: unknown) => {
      if (done) return
      stop()
      ac.abort(reason)
      fail(reason)
    }
    const deadline = core.deadlines.acquire.add(started, () => {
      core.timeouts++
      const err = core.poolTimeout(this.name)
      if (channels.timeout.hasSubscribers) {
        const waitMs = performance.now() - started
        channels.timeout.publish({ scope: core.name, session: this, error: err, waitMs })
      }
      giveUp(err)
    })
    const onFrameAbort = () => giveUp(frame.aborted)
    frame.addAbortWaiter(onFrameAbort)
    let pending: Promise<C>
    try {
      pending = core.driver.acquire(ac.signal)
    } catch (e) {
      stop()
      core.recycle(ac)
      fail(e)
      return
    }
    pending.then(
      (conn) => {
        if (done) {
          // The driver delivered after we gave up: straight back, never leaked.
          core.giveBack(conn)
          return
        }
        stop()
        core.recycle(ac)
        if (this.#phase !== 'acquiring') {
          // The session was closed while we waited (close() of an untracked connection() call).
          core.giveBack(conn)
          fail(this.#closedError('connection()'))
          return
        }
        try {
          this.#acquired(conn, started)
        } catch (e) {
          fail(e)
          return
        }
        // Joiners first: resolving only queues their reactions, so `fn` of the party that
        // started the checkout still runs first, and a use `fn` issues at once queues behind them.
        const join = this.#joinResolve
        this.#unjoin()
        join?.(conn)
        onConn(conn)
      },
      (e) => {
        if (done) return
        stop()
        core.recycle(ac)
        fail(e)
      },
    )
  }

  #unjoin(): void {
    this.#acquiring = undefined
    this.#joinResolve = this.#joinReject = undefined
  }

  /** The connection is ours: hold it, arm the leak and hold deadlines, count it. */
  #acquired(conn: C, started: number): void {
    const core = this.#core
    this.#conn = conn
    this.#heldSince = performance.now()
    this.#to('acquired')
    core.acquired(this, this.#heldSince - started)
    const { leak, hold } = core.deadlines
    if (leak) this.#leakDeadline = leak.add(this.#heldSince, () => core.leak(this))
    if (hold) {
      this.#holdDeadline = hold.add(this.#heldSince, () => {
        core.forced++
        this.forceRelease(
          `its connection was destroyed after being held ${core.options.maxHoldMs} ms (maxHoldMs)`,
        )
      })
    }
  }

  /**
   * BEGIN through the driver: the driver's promise with the failure handled on it,
   * and `then` (if given) in the same reaction.
   */
  #begin<R = void>(opts: TxOptions, explicit: boolean, then?: () => R): Promise<R> {
    const driver = this.#core.driver
    if (!driver.begin) {
      return Promise.reject(
        new TransactionStateError(
          `transaction() on session '${this.name}': driver '${driver.name}' has no begin(); it cannot run transactions.`,
        ),
      )
    }
    const conn = this.#conn as C
    const frame: TxFrame = {
      savepoint: undefined,
      explicit,
      around: false,
      afterCommit: this.#pending?.afterCommit ?? noHooks,
      afterRollback: this.#pending?.afterRollback ?? noHooks,
    }
    this.#pending = undefined
    // A pipelined BEGIN of an earlier unit that failed is over (its error went to its own
    // statements): what runs in this unit waits on this BEGIN only.
    this.#began = undefined
    // Pushed before BEGIN resolves, so concurrent first statements see the transaction.
    this.#tx.push(frame)
    const failed = (reason: unknown): never => {
      const e = asFailure(reason, 'BEGIN', this)
      this.#tx.length = 0
      this.#pending = frame
      this.#noteError(conn, e)
      this.#dirty = true
      throw e
    }
    let began: Promise<void>
    try {
      began = Promise.resolve(driver.begin(conn, opts, this))
    } catch (e) {
      began = Promise.reject(e)
    }
    return began.then(then as () => R, failed)
  }

  async #outermost<T>(fn: () => Promise<T>, opts: TxOptions, around: boolean): Promise<T> {
    const attempts = opts.retry?.attempts ?? 1
    const backoffMs = opts.retry?.backoffMs ?? 10
    for (let attempt = 1; ; attempt++) {
      // maxHoldMs or a shutdown may have taken the connection during the backoff.
      const closed = attempt > 1 ? this.#unusable('transaction()') : undefined
      if (closed) throw closed
      await this.#checkout()
      if (this.#ready) await this.#ready
      if (this.#tx.length > 0) {
        // Another first use began the unit of work meanwhile: we are nested in it.
        return this.#nested(fn, opts, around)
      }
      const conn = this.#conn as C
      await this.#setReady(this.#begin(opts, true, () => conn))
      const root = this.#tx[0] as TxFrame
      root.around = around
      let result: T
      try {
        result = await (around ? fn() : this.#frame.enterTransaction(root, fn))
      } catch (e) {
        if (this.#forced) throw this.#takenError(e)
        if (this.#tx.length > 0) await this.#endTransaction(false, e)
        if (attempt < attempts && this.#core.driver.isRetryable?.(e) && !this.#frame.aborted) {
          await sleep(backoffMs * 2 ** (attempt - 1) * (0.5 + Math.random()))
          continue
        }
        throw e
      }
      // Taken by force while fn ran (maxHoldMs, a shutdown): nothing was committed, whatever
      // fn returned.
      if (this.#forced) throw this.#takenError()
      try {
        await this.#endTransaction(true)
      } catch (e) {
        if (attempt < attempts && this.#core.driver.isRetryable?.(e) && !this.#frame.aborted) {
          await sleep(backoffMs * 2 ** (attempt - 1) * (0.5 + Math.random()))
          continue
        }
        throw e
      }
      return result
    }
  }

  async #nested<T>(fn: () => Promise<T>, opts: TxOptions, around: boolean): Promise<T> {
    const root = this.#tx[0]
    if (opts.isolation !== undefined || opts.readOnly !== undefined) {
      throw new TransactionStateError(
        `transaction() on session '${this.name}' is nested in an open transaction, so it is a savepoint and cannot set ` +
          `${opts.isolation !== undefined ? 'isolation' : 'readOnly'}. Fix: call it before the first statement of the unit of work, ` +
          `or run the scope with transaction: 'none'.`,
      )
    }
    const driver = this.#core.driver
    if (!driver.savepoint || !driver.rollbackToSavepoint || !driver.releaseSavepoint) {
      throw new TransactionStateError(
        `nested transaction() on session '${this.name}': driver '${driver.name}' has no savepoint support.`,
      )
    }
    const conn = await (this.#ready ?? this.#prepare())
    if (this.#began) await this.#beganOrThrow()
    const top = this.#tx[this.#tx.length - 1]
    if (top?.explicit && !top.around && this.#frame.transactionHere() !== top) {
      // Started beside a running transaction(fn), not inside its fn: on the one connection it
      // would be a savepoint inside the other, undone when the other rolls back even after it
      // resolved. Refused before anything runs.
      throw new TransactionStateError(
        `transaction() on session '${this.name}' was called while another transaction(fn) of the session ` +
          'is running, from outside that fn (two at once, e.g. Promise.all). On its one connection it would ' +
          'become part of the other and be undone if the other rolls back. Nothing of it ran. Fix: await one ' +
          'transaction() before starting the next, or give parallel work scopes of its own (runJob). ' +
          '(A call inside the other fn that reached here through a callback API which loses AsyncLocalStorage ' +
          'context looks the same: keep the context, e.g. with AsyncResource.bind.)',
      )
    }
    const name = `scoped_sp_${++this.#savepoints}`
    const frame: TxFrame = {
      savepoint: name,
      explicit: true,
      around,
      afterCommit: noHooks,
      afterRollback: noHooks,
    }
    // On the stack before the SAVEPOINT is answered, so a transaction() started meanwhile
    // beside this one sees it.
    this.#tx.push(frame)
    try {
      await driver.savepoint(conn, name)
    } catch (e) {
      if (this.#tx[this.#tx.length - 1] === frame) this.#tx.pop()
      throw e
    }
    let result: T
    try {
      result = await (around ? fn() : this.#frame.enterTransaction(frame, fn))
    } catch (e) {
      // Taken by force meanwhile (maxHoldMs, a shutdown): the stack went with the connection.
      if (this.#forced) throw this.#takenError(e)
      this.#popFrame(frame)
      await this.#rollBackSavepoint(conn, name, frame)
      throw e
    }
    if (this.#forced) throw this.#takenError()
    this.#popFrame(frame)
    try {
      await driver.releaseSavepoint(conn, name)
    } catch (releaseError) {
      if (this.#forced) throw this.#takenError(releaseError)
      // A statement inside failed and fn caught its error: the database aborted the
      // savepoint, so it cannot be released. Roll back to it: its writes are undone, and the
      // unit of work around it goes on (the savepoint was there to protect it).
      await this.#rollBackSavepoint(conn, name, frame, releaseError)
      throw new TransactionStateError(
        `transaction() on session '${this.name}' (savepoint ${name}) was rolled back, not released: ` +
          'a statement inside it failed and fn caught the error, so the database had aborted the savepoint. ' +
          'Its writes are undone; the unit of work around it goes on. Fix: let the error propagate out of fn, ' +
          'or give the failing statement a transaction(fn) of its own.',
        { cause: releaseError },
      )
    }
    const parent = this.#tx[this.#tx.length - 1] ?? root!
    addHooks(parent, 'afterCommit', frame.afterCommit)
    addHooks(parent, 'afterRollback', frame.afterRollback)
    return result
  }

  /** ROLLBACK TO the savepoint, then its afterRollback hooks; if that fails too, the connection is not trusted and `failure` is thrown. */
  async #rollBackSavepoint(
    conn: C,
    name: string,
    frame: TxFrame,
    failure?: unknown,
  ): Promise<void> {
    try {
      await this.#core.driver.rollbackToSavepoint!(conn, name)
    } catch (rbErr) {
      this.#noteError(conn, rbErr)
      this.#dirty = true
      if (failure !== undefined) throw failure
      return
    }
    await this.#runHooks(frame.afterRollback, 'afterRollback')
  }

  /**
   * The connection was taken by force under `call` (maxHoldMs, a shutdown):
   * nothing of it was committed. The call's own SessionClosedError, or one
   * that says so (with the driver's or fn's error as its cause).
   */
  #takenError(cause?: unknown, call = 'transaction()'): Error {
    if (cause instanceof SessionClosedError) return cause
    const closed = this.#closedError(call)
    if (cause !== undefined) closed.cause = cause
    return closed
  }

  #popFrame(frame: TxFrame): void {
    if (this.#tx[this.#tx.length - 1] !== frame) {
      // The savepoint stack no longer matches the server's: nothing of this unit may commit.
      this.#dirty = true
      this.#rollbackOnly = true
      throw new TransactionStateError(
        `transaction() calls on session '${this.name}' overlapped (two ran at once at the same depth). ` +
          'Fix: await one transaction() before starting the next in the same session.',
      )
    }
    this.#tx.pop()
  }

  /**
   * COMMIT or ROLLBACK the real transaction, then run its hooks, then `then` (with
   * the failure, if any: close() releases in the same reaction). The usual COMMIT
   * (no pipelined BEGIN pending, a sound connection, no hooks) is one promise: this
   * is the end of every unit of work.
   */
  #endTransaction(commit: boolean, cause?: unknown): Promise<void>
  #endTransaction<R>(commit: boolean, cause: unknown, then: (failure: unknown) => R): Promise<R>
  #endTransaction<R>(
    commit: boolean,
    cause?: unknown,
    then?: (failure: unknown) => R,
  ): Promise<R | void> {
    if (this.#began) return andThen(this.#endAfterBegan(commit, cause), then)
    const root = this.#tx[0]
    const conn = this.#conn
    if (!root || conn === undefined) return andThen(this.#endEmptyTransaction(commit), then)
    this.#tx.length = 0
    this.#ending = true
    this.#ready = undefined
    this.#rollbackOnly = false
    if (!commit) return andThen(this.#rollBackUnit(conn, root, cause), then)
    if (this.#broken !== undefined) return andThen(this.#commitRefused(conn, root), then)
    let committing: Promise<void>
    try {
      committing = Promise.resolve(this.#core.driver.commit!(conn))
    } catch (e) {
      committing = Promise.reject(e)
    }
    return committing.then(
      () => {
        this.#ending = false
        // maxHoldMs or a shutdown may have taken the connection meanwhile: it committed anyway.
        if (this.#forced) this.#committedAnyway = true
        this.#core.committed++
        if (channels.commit.hasSubscribers)
          channels.commit.publish({ scope: this.#core.name, session: this })
        if (root.afterCommit.length > 0) {
          return andThen(this.#runHooks(root.afterCommit, 'afterCommit'), then)
        }
        return then?.(undefined)
      },
      (e: unknown) => andThen(this.#commitFailed(conn, root, e), then),
    )
  }

  /** A pipelined BEGIN is still unanswered: its outcome decides what ending means. */
  async #endAfterBegan(commit: boolean, cause: unknown): Promise<void> {
    try {
      await this.#beganOrThrow()
    } catch (e) {
      // The unit of work never began, and nothing sent behind its BEGIN can be trusted:
      // no COMMIT, the connection (already marked dirty) is destroyed.
      this.#began = undefined
      if (commit) {
        const pending = this.#pending
        this.#pending = undefined
        this.#rollbackOnly = false
        if (pending) await this.#runHooks(pending.afterRollback, 'afterRollback')
        throw e
      }
    }
    return this.#endTransaction(commit, cause)
  }

  /** Nothing began: an empty unit of work. Its hooks still learn how it ended. */
  async #endEmptyTransaction(commit: boolean): Promise<void> {
    const pending = this.#pending
    this.#pending = undefined
    this.#rollbackOnly = false
    if (pending) {
      await this.#runHooks(
        commit ? pending.afterCommit : pending.afterRollback,
        commit ? 'afterCommit' : 'afterRollback',
      )
    }
  }

  async #rollBackUnit(conn: C, root: TxFrame, cause: unknown): Promise<void> {
    await this.#rollbackQuietly(conn, cause)
    this.#core.rolledBack++
    this.#publishRollback(cause)
    if (root.afterRollback.length > 0) await this.#runHooks(root.afterRollback, 'afterRollback')
  }

  /** The connection failed earlier: no COMMIT is attempted; it will be destroyed. */
  async #commitRefused(conn: C, root: TxFrame): Promise<never> {
    await this.#rollbackQuietly(conn)
    this.#core.rolledBack++
    this.#publishRollback(this.#broken)
    await this.#runHooks(root.afterRollback, 'afterRollback')
    throw new TransactionStateError(
      `COMMIT of session '${this.name}' was not attempted: its connection failed earlier and will be destroyed.`,
      { cause: this.#broken },
    )
  }

  async #commitFailed(conn: C, root: TxFrame, reason: unknown): Promise<never> {
    // Rejected with nothing: still a failure (undefined would read as "no failure" below).
    const e = asFailure(reason, 'COMMIT', this)
    this.#noteError(conn, e)
    // The server ends a transaction whose COMMIT failed; make sure, and never reuse it if unsure.
    await this.#rollbackQuietly(conn)
    this.#core.rolledBack++
    this.#publishRollback(e)
    await this.#runHooks(root.afterRollback, 'afterRollback')
    throw e
  }

  #publishRollback(error: unknown): void {
    if (channels.rollback.hasSubscribers) {
      channels.rollback.publish({
        scope: this.#core.name,
        session: this,
        ...(error !== undefined && { error }),
      })
    }
  }

  /** ROLLBACK at the end of the unit of work; once answered (or skipped) the session is no longer ending it. */
  async #rollbackQuietly(conn: C, cause?: unknown): Promise<void> {
    try {
      if (this.#broken !== undefined) return // a dead connection is destroyed; the server discards its transaction
      await this.#core.driver.rollback?.(conn)
    } catch (e) {
      this.#noteError(conn, e)
      this.#dirty = true
      if (cause === undefined) this.#core.report(e, 'rollback', this)
    } finally {
      this.#ending = false
    }
  }

  #close(commit: boolean): Promise<SessionOutcome> {
    if (this.#inFlight === 0) {
      try {
        return this.#closeIdle(commit)
      } catch (e) {
        return Promise.reject(e)
      }
    }
    return new Promise<void>((resolve) => {
      this.#drained = resolve
    }).then(() => this.#closeIdle(commit))
  }

  /** close() once no tracked use runs: end the transaction, if any, then release. */
  #closeIdle(commit: boolean): Promise<SessionOutcome> {
    // The timers stay armed: maxHoldMs bounds a COMMIT that hangs, or an afterCommit hook
    // that never settles, as it bounds a statement (the release clears them).
    if (this.#phase === 'closed') return Promise.resolve(this.#outcome!) // force-released while we waited
    const conn = this.#conn
    const wantCommit = this.#startClose(commit)
    const finish = (failure: unknown) => this.#finishClose(conn, wantCommit, failure)
    // A pipelined BEGIN still counts while its outcome is unknown (or failed unseen).
    if (this.#tx.length > 0 || this.#began)
      return this.#endTransaction(wantCommit, undefined, finish)
    if (this.#pending) return andThen(this.#endEmptyUnit(wantCommit), finish)
    try {
      return Promise.resolve(finish(undefined))
    } catch (e) {
      return Promise.reject(e)
    }
  }

  /** Into 'closing': whether the unit of work is to commit. */
  #startClose(commit: boolean): boolean {
    this.#to('close')
    this.#closedHow ||= `it was closed when its ${this.#frame.kind} ended`
    // No stack here: it would show the scope's or adapter's end, never the user's code. The
    // closed error shows the checkout site instead (where the session first ran a statement).
    return commit && !this.#rollbackOnly && !this.#frame.aborted
  }

  /** The transaction (if any) has ended: release the connection, into 'closed'. */
  #finishClose(conn: C | undefined, wantCommit: boolean, failure: unknown): SessionOutcome {
    if (this.#phase === 'closed') {
      // Taken by force (maxHoldMs, a shutdown's timeout) while its COMMIT, ROLLBACK or hooks
      // ran: the connection is gone already, and the outcome is 'destroyed'.
      if (failure !== undefined) throw this.#lostCommit(failure)
      return this.#outcome!
    }
    const committed = wantCommit && failure === undefined
    const destroy = this.#broken !== undefined || this.#dirty
    this.#outcome =
      destroy || this.#destroyedBefore
        ? 'destroyed'
        : conn === undefined && !this.#heldBefore
          ? 'empty'
          : committed
            ? 'committed'
            : 'rolled-back'
    if (conn !== undefined) this.#finishRelease(conn, destroy, this.#broken)
    this.#to('released')
    this.#publishClose()
    if (failure !== undefined) throw failure
    return this.#outcome
  }

  /**
   * The COMMIT failed after maxHoldMs or a shutdown took its connection (the
   * socket was destroyed under it): whether the server committed is unknown.
   */
  #lostCommit(failure: unknown): Error {
    if (failure instanceof ScopedError) return failure
    return new TransactionStateError(
      `COMMIT of session '${this.name}' (${this.id}) did not complete: ${this.#closedHow} while it ran, ` +
        'so whether the database committed is unknown. Check for the writes before retrying the work.',
      { cause: failure },
    )
  }

  /** No transaction is open at the end: hooks registered for the unit of work still learn its fate. */
  async #endEmptyUnit(commit: boolean): Promise<void> {
    const pending = this.#pending
    this.#pending = undefined
    if (pending) {
      await this.#runHooks(commit ? pending.afterCommit : pending.afterRollback, 'close')
    }
  }

  /** Once per session: both ways into 'closed' (released, forceRelease) call it. */
  #publishClose(): void {
    if (channels.close.hasSubscribers) {
      channels.close.publish({
        scope: this.#core.name,
        session: this,
        outcome: this.#outcome,
        durationMs: performance.now() - this.#createdAt,
      })
    }
  }

  #finishRelease(conn: C, destroy: boolean, error: unknown): void {
    this.#clearTimers()
    this.#ending = false
    this.#conn = undefined
    this.#ready = undefined
    this.#began = undefined
    this.#tx.length = 0
    this.#core.released(this, conn, destroy, error, performance.now() - this.#heldSince)
  }

  #clearTimers(): void {
    this.#leakDeadline?.cancel()
    this.#holdDeadline?.cancel()
    this.#leakDeadline = this.#holdDeadline = undefined
  }

  #rejectHooks(): void {
    const hooks = this.#tx.flatMap((f) => f.afterRollback)
    this.#tx.length = 0
    void this.#runHooks(hooks, 'afterRollback')
  }

  #settle(): void {
    if (--this.#inFlight !== 0) return
    if (this.#drained) {
      const d = this.#drained
      this.#drained = undefined
      d()
    } else if (this.#releaseIdle) {
      this.#releaseIfIdle()
    }
  }

  /**
   * `release: 'idle'`: nothing uses the connection now (no statement, no
   * transaction, not handed out by `connection()`), so it goes back to the
   * pool, or is destroyed when it failed. The next statement checks one out.
   */
  #releaseIfIdle(): void {
    if (this.#phase !== 'holding' || this.#closeRequested || this.#pinned) return
    if (this.#tx.length > 0 || this.#running > 0) return
    const conn = this.#conn as C
    const broken = this.#broken
    const destroy = broken !== undefined || this.#dirty
    // All of it before the driver hears of the release: the release may end the scope there
    // (a pool listener, shutdown code), which must find the session idle, not half-released.
    this.#to('idleRelease')
    this.#heldBefore = true
    if (destroy) this.#destroyedBefore = true
    // Those belonged to the connection given back; the next one starts clean.
    this.#broken = undefined
    this.#dirty = false
    this.#finishRelease(conn, destroy, broken)
  }

  #noteError(conn: C, e: unknown): void {
    if (this.#broken !== undefined) return
    let fatal: unknown
    try {
      fatal = this.#core.driver.isFatal?.(conn, e)
    } catch (err) {
      // A driver that cannot tell: the connection is not trusted (destroyed at release).
      this.#core.report(err, 'isFatal', this)
      fatal = true
    }
    if (fatal) this.#broken = e
  }

  /** @internal `remove()` is closing it: application code, so where is worth a stack. */
  noteRemoved(): void {
    this.#closedHow ||= 'it was closed by remove()'
    if (this.#core.options.captureStacks) this.#closedAt = captureStack('closed here')
  }

  #hook(kind: 'afterCommit' | 'afterRollback', fn: Hook): void {
    if (typeof fn !== 'function')
      throw new TypeError(`${kind}(fn): fn must be a function, got ${typeof fn}`)
    const err = this.#unusable(`${kind}()`)
    if (err) throw err
    const top = this.#tx[this.#tx.length - 1]
    if (top) {
      addHooks(top, kind, [fn])
    } else if (this.#mode === 'auto') {
      this.#pending ??= {
        savepoint: undefined,
        explicit: false,
        around: false,
        afterCommit: noHooks,
        afterRollback: noHooks,
      }
      addHooks(this.#pending, kind, [fn])
    } else if (kind === 'afterCommit') {
      // Autocommit: nothing is pending, so "after commit" is now (as Django's on_commit).
      void this.#runHooks([fn], kind)
    }
    // afterRollback outside a transaction in autocommit: nothing can roll back, nothing to run.
  }

  /** In order, one after another; an error is reported and never fails the commit. */
  async #runHooks(hooks: Hook[], during: string): Promise<void> {
    for (const h of hooks) {
      try {
        await h()
      } catch (e) {
        this.#core.report(e, during, this)
      }
    }
  }

  #unusable(call: string): Error | undefined {
    if (this.#closeRequested || this.#phase === 'closed') return this.#closedError(call)
    return this.#frame.aborted
  }

  #closedError(call: string): Error {
    const how = this.#closedHow || `it is closing (its ${this.#frame.kind} ended)`
    // After remove(): where it was called. Otherwise where the session first ran a statement.
    const [label, site] = this.#closedAt
      ? ['Closed at', this.#closedAt]
      : ['First statement at', this.#firstSite]
    return new SessionClosedError(this, call, how, site && { label, stack: userFrames(site.stack) })
  }
}

/** A rejection's reason as a failure: a driver that rejected with nothing still failed. */
function asFailure(reason: unknown, what: string, session: { readonly name: string }): unknown {
  if (reason !== undefined && reason !== null) return reason
  return new Error(
    `${what} of session '${session.name}' failed: the driver rejected with ${reason} instead of an error.`,
  )
}

/** `fn(conn)` as a promise: a synchronous throw becomes its rejection. */
function called<C, T>(fn: (conn: C) => Promise<T>, conn: C): Promise<T> {
  try {
    return Promise.resolve(fn(conn))
  } catch (e) {
    return Promise.reject(e)
  }
}

/** `p`, then `then` with its failure (or undefined) when given; `p` itself when not. */
function andThen<R>(p: Promise<void>, then: (failure: unknown) => R): Promise<R>
function andThen<R>(
  p: Promise<void>,
  then: ((failure: unknown) => R) | undefined,
): Promise<R | void>
function andThen<R>(
  p: Promise<void>,
  then: ((failure: unknown) => R) | undefined,
): Promise<R | void> {
  return then ? p.then(() => then(undefined), then) : p
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms))
}

const isolations = new Set(['read committed', 'repeatable read', 'serializable'])

function validateTxOptions(opts: TxOptions): void {
  if (typeof opts !== 'object' || opts === null) {
    throw new TypeError(
      `transaction(fn, opts): opts must be an object, got ${opts === null ? 'null' : typeof opts}`,
    )
  }
  if (opts.isolation !== undefined && !isolations.has(opts.isolation)) {
    throw new TypeError(
      `transaction(fn, { isolation }): expected 'read committed', 'repeatable read' or 'serializable', got ${JSON.stringify(opts.isolation)}`,
    )
  }
  if (opts.readOnly !== undefined && typeof opts.readOnly !== 'boolean') {
    throw new TypeError(
      `transaction(fn, { readOnly }): expected a boolean, got ${typeof opts.readOnly}`,
    )
  }
  if (opts.retry !== undefined) {
    const { attempts, backoffMs } = opts.retry
    if (!Number.isInteger(attempts) || attempts < 1) {
      throw new TypeError(
        `transaction(fn, { retry: { attempts } }): expected an integer >= 1, got ${attempts}`,
      )
    }
    if (backoffMs !== undefined && !(Number.isFinite(backoffMs) && backoffMs >= 0)) {
      throw new TypeError(
        `transaction(fn, { retry: { backoffMs } }): expected a finite number >= 0, got ${backoffMs}`,
      )
    }
  }
}
