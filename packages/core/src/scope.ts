/**
 * The scope registry: which session belongs to the code running now.
 *
 * As SQLAlchemy's `scoped_session` with a `scopefunc`, but the "scope" is an
 * async context: every `run()`/`runJob()` (or adapter request) opens one, and
 * `getSession()` anywhere inside it returns that scope's session.
 */
import { AsyncLocalStorage } from 'node:async_hooks'
import { getEventListeners } from 'node:events'
import { Deadlines } from './deadlines.js'
import { channels } from './diagnostics.js'
import type { Driver, PoolStats } from './driver.js'
import {
  type AbortKind,
  NoActiveScopeError,
  PoolTimeoutError,
  ScopeAbortedError,
  ScopeClosedError,
  SessionClosedError,
  TransactionStateError,
} from './errors.js'
import type { Holder } from './holders.js'
import { type ResolvedOptions, resolveOptions, type ScopeOptions } from './options.js'
import { type ReleaseMode, Session, type SessionOutcome, type TransactionMode } from './session.js'

export interface RunOptions {
  /** The session's name in holders, stats and errors. Default `'run'` (`job:<name>` for jobs). */
  name?: string
  /** A request or job id, shown in holders. */
  requestId?: string
  /** Abort the scope (rollback-only, `session.signal` aborts) when this fires. */
  signal?: AbortSignal
  /** Override the scope's transaction mode for this run. */
  transaction?: TransactionMode
  /**
   * Override when the session gives its connection back (`'idle'` needs
   * `transaction: 'none'`). Default: the scope's `release` when the run's mode
   * is `'none'`; `'end'` for a unit of work.
   */
  release?: ReleaseMode
}

/**
 * The options of `scope.open()`: `run()`'s, and a `name` that may be a
 * function, for an adapter that learns the name after the scope opened (an
 * Express route is known only after routing). The function is asked each
 * time the name is read (when the session is made, in error messages), so it
 * must be cheap and must not throw.
 */
export interface OpenOptions extends Omit<RunOptions, 'name'> {
  name?: string | (() => string)
  /** `request`, `job`, …: how error messages speak of the scope. Default `scope`. */
  kind?: string
  /**
   * Called each time the scope makes a session (its first `getSession()`, and
   * the first after a `remove()`), once the session is in place, before it is
   * returned: an adapter can start watching for client aborts only in scopes
   * that use the database. It runs inside `getSession()`, so it must be cheap
   * and must not throw; it may call `abort()`.
   */
  onSession?: () => void
}

export interface JobOptions extends RunOptions {
  /** Abort the job (rollback, cancel its running statement) after this many ms. */
  timeoutMs?: number
}

export interface LoopOptions extends JobOptions {
  /** Pause between iterations. Default 0. */
  intervalMs?: number
  /** After a failed iteration, wait initialMs, doubling up to maxMs. Default 100 → 30 000. */
  backoff?: { initialMs?: number; maxMs?: number }
}

export interface ScopeStats {
  name: string
  driver: string
  /** Scopes (requests, jobs) running now. */
  open: number
  /** Sessions holding a connection now. */
  holding: number
  /** Sessions with a transaction open now. */
  inTransaction: number
  /** Sessions waiting for a connection now. */
  waiting: number
  totals: {
    acquired: number
    committed: number
    rolledBack: number
    destroyed: number
    leaks: number
    timeouts: number
    /** Connections taken by force (maxHoldMs, shutdown timeout). */
    forced: number
  }
  /** The driver's pool figures, when it reports them. */
  pool: PoolStats | undefined
}

/**
 * A scope of sessions over one driver (one pool).
 *
 * @example
 * ```ts
 * const scope = createScope({ driver: pgDriver(new pg.Pool()) })
 * await scope.runJob(async () => {
 *   await scope.getSession().use((c) => c.query('UPDATE jobs SET done = true'))
 * }, { name: 'mark-done' })
 * ```
 */
export interface Scope<C> {
  readonly name: string
  readonly driver: Driver<C>
  readonly options: ResolvedOptions
  /** The current scope's session. Throws `NoActiveScopeError` outside a scope. */
  getSession(): Session<C>
  /** True inside a scope of this `Scope` (whether or not it touched the database). */
  hasSession(): boolean
  /** Run `fn` in a new scope: commit when it resolves, roll back when it throws, release always. */
  run<T>(fn: () => Promise<T>, opts?: RunOptions): Promise<T>
  /** `run()` named `job:<name>`, with `timeoutMs` and `signal`. For each iteration of a worker. */
  runJob<T>(fn: () => Promise<T>, opts?: JobOptions): Promise<T>
  /** Run `fn` as a job forever, until `signal` aborts (after the current iteration) or the scope closes. */
  loop(fn: () => Promise<void>, opts: LoopOptions): Promise<void>
  /**
   * Close the current session now (rolling back what is not committed); the next
   * `getSession()` opens a new one. Waits for the session's running uses, so never
   * `await` it inside a `use()` callback (it would wait for itself).
   */
  remove(): Promise<void>
  /** For adapters: open a scope whose end the caller controls. */
  open(opts?: OpenOptions): OpenScope<C>
  stats(): ScopeStats
  /** Sessions holding a connection now, longest-held first. */
  holders(): Holder[]
  /** Refuse new scopes, wait for open ones (up to `timeoutMs`, default 10 000), destroy what remains, end the driver. */
  close(opts?: { timeoutMs?: number }): Promise<void>
}

/** @internal What sessions see of their scope. */
export interface ScopeCore<C> {
  readonly name: string
  readonly idPrefix: string
  readonly driver: Driver<C>
  readonly options: ResolvedOptions
  /** No new scopes (close() was called). */
  closed: boolean
  /** No new checkouts (the driver is ending). */
  ended: boolean
  waiting: number
  timeouts: number
  committed: number
  rolledBack: number
  forced: number
  poolTimeout(sessionName: string): PoolTimeoutError
  acquired(session: Session<C>, waitMs: number): void
  released(session: Session<C>, conn: C, destroy: boolean, error: unknown, heldMs: number): void
  giveBack(conn: C): void
  /** One timer per kind of deadline (all of a kind have the same length); leak and hold when enabled. */
  readonly deadlines: {
    acquire: Deadlines
    leak: Deadlines | undefined
    hold: Deadlines | undefined
  }
  /**
   * An unaborted AbortSignal's controller for `driver.acquire()`, from a free list.
   * Node 20 takes microseconds to make an AbortSignal; a checkout needs one only
   * for as long as it waits.
   */
  signal(): AbortController
  /** Back to the free list after the checkout settled, unless the driver still listens to it. */
  recycle(ac: AbortController): void
  leak(session: Session<C>): void
  report(error: unknown, during: string, session?: Session<C>): void
}

/**
 * One open scope: a request or a job. Holds the current session (made on first
 * `getSession()`), the abort state and the end. Adapters drive it directly:
 *
 * @example
 * ```ts
 * const open = scope.open({ name: 'GET /orders/:id' })
 * open.enter(() => next())            // the chain runs inside the scope
 * await open.end({ commit: status < 500 })
 * ```
 */
export class OpenScope<C> {
  readonly requestId: string | undefined
  /** `request`, `job` or `scope`: how error messages speak of it. */
  readonly kind: string
  /** @internal */ aborted: ScopeAbortedError | undefined
  /**
   * @internal Its Scope's open scopes are a list linked through these: adding
   * and removing one costs no hashing (a Set hashes every new scope, which a
   * request that never queries pays for).
   */
  prevOpen: OpenScope<C> | undefined = undefined
  /** @internal */ nextOpen: OpenScope<C> | undefined = undefined

  #name: string | (() => string)
  #scope: ScopeImpl<C>
  #mode: TransactionMode
  #releaseIdle: boolean
  #session: Session<C> | undefined
  #removed = false
  /** Sessions of this scope that remove() is still closing. */
  #removals = 0
  #ending: Promise<SessionOutcome> | undefined
  /** How an end that completed at once (endNow) went; `#ending` is made only if asked for. */
  #endOutcome: SessionOutcome | undefined
  #endFailure: { error: unknown } | undefined
  #ended = false
  #controller: AbortController | undefined
  #external: AbortSignal | undefined
  #onExternal: (() => void) | undefined
  /** Called once when the scope aborts: pending checkouts stop waiting. Made when first needed. */
  #abortWaiters: Set<() => void> | undefined
  /** The usual case, one waiter (a session's checkout): no Set is made for it. */
  #abortWaiter: (() => void) | undefined
  #onSession: (() => void) | undefined

  /** @internal */
  constructor(scope: ScopeImpl<C>, opts: OpenOptions, name: string | (() => string)) {
    this.#scope = scope
    this.#name = name
    this.#onSession = opts.onSession
    this.kind = opts.kind ?? 'scope'
    this.requestId = opts.requestId
    this.#mode = opts.transaction ?? scope.options.transaction
    this.#releaseIdle = this.#mode === 'none' && (opts.release ?? scope.options.release) === 'idle'
    const signal = opts.signal
    if (signal) {
      if (signal.aborted) this.abort('signal')
      else {
        this.#external = signal
        this.#onExternal = () => this.abort('signal', { cancel: true })
        signal.addEventListener('abort', this.#onExternal, { once: true })
      }
    }
  }

  /** The name its session takes when it is made (`open({ name })` may give it lazily). */
  get name(): string {
    const name = this.#name
    return typeof name === 'string' ? name : name()
  }

  /** True once `end()` finished: `getSession()` from work left behind now throws. */
  get ended(): boolean {
    return this.#ended
  }

  /** Aborted when the scope is aborted (client abort, timeout, signal, shutdown). */
  get signal(): AbortSignal {
    if (!this.#controller) {
      this.#controller = new AbortController()
      if (this.aborted) this.#controller.abort(this.aborted)
    }
    return this.#controller.signal
  }

  /** @internal A pending checkout stops waiting when the scope aborts. */
  addAbortWaiter(fn: () => void): void {
    if (this.#abortWaiter === undefined && this.#abortWaiters === undefined) {
      this.#abortWaiter = fn
      return
    }
    this.#abortWaiters ??= new Set()
    if (this.#abortWaiter !== undefined) {
      this.#abortWaiters.add(this.#abortWaiter)
      this.#abortWaiter = undefined
    }
    this.#abortWaiters.add(fn)
  }

  /** @internal */
  removeAbortWaiter(fn: () => void): void {
    if (this.#abortWaiter === fn) this.#abortWaiter = undefined
    else this.#abortWaiters?.delete(fn)
  }

  /** The current session, made on first use; after `remove()`, a new one. */
  get session(): Session<C> {
    return this.current('session')
  }

  /** @internal */
  current(call: string): Session<C> {
    const s = this.#session
    if (this.#ended || this.#ending) {
      if (s) return s // closed or closing: its every call throws SessionClosedError, naming it
      throw new SessionClosedError(
        { id: '-', name: this.name },
        call,
        `its ${this.kind} already ended`,
        undefined,
      )
    }
    // After remove(), the removed session only until its close() began: even while that still
    // waits for a running use, the next getSession() gets a new one.
    if (s && !(this.#removed && s.closeRequested)) return s
    this.#removed = false
    const session = new Session(this.#scope.core, this, this.#mode, this.#releaseIdle)
    this.#session = session
    this.#onSession?.()
    return session
  }

  /** The session if one was made, without making one. */
  get existingSession(): Session<C> | undefined {
    return this.#session
  }

  /** Run `fn` (synchronously) inside this scope: `getSession()` in it, and in all it starts, is ours. */
  enter<T>(fn: () => T): T {
    return this.#scope.als.run(this, fn)
  }

  /**
   * @internal Run a `transaction(fn)`'s fn: inside this scope, and known to be
   * inside transaction `tx` (so a transaction() started beside it, not inside
   * it, can be told apart and refused).
   */
  enterTransaction<T>(tx: object, fn: () => T): T {
    return this.#scope.als.run(new InTransaction(this, tx), fn)
  }

  /** @internal The transaction whose fn the caller runs inside, if any (and if the context was kept). */
  transactionHere(): object | undefined {
    const store = this.#scope.als.getStore()
    return store instanceof InTransaction && store.open === this ? store.tx : undefined
  }

  /**
   * Abort: the unit of work becomes rollback-only, `session.signal` aborts, a
   * pending checkout stops waiting, and (with `cancel`) the running statement is
   * cancelled on the server. The connection is NOT released here: that waits
   * for `end()`, after the handler settled.
   */
  abort(kind: AbortKind, opts: { detail?: string; cancel?: boolean } = {}): void {
    // Once end() has begun, the outcome is being decided: an abort now (the client leaving
    // during COMMIT) must not turn a unit of work that commits into a reported rollback.
    if (this.aborted || this.#ended || this.#ending) return
    this.aborted = new ScopeAbortedError(this.name, kind, opts.detail)
    this.#controller?.abort(this.aborted)
    const one = this.#abortWaiter
    this.#abortWaiter = undefined
    one?.()
    if (this.#abortWaiters) for (const fn of this.#abortWaiters) fn()
    this.#session?.onAbort(opts.cancel ?? false)
  }

  /** @internal remove(): close the current session now; the next getSession() opens another. */
  async remove(): Promise<void> {
    const s = this.#session
    if (!s || s.state === 'closed') return
    if (s.inExplicitTransaction) {
      // close() waits for tracked work, and the transaction(fn) we are inside is tracked work.
      throw new TransactionStateError(
        `remove() on session '${s.name}' inside transaction(fn) would wait for itself. ` +
          'Fix: call remove() after the transaction(fn) returns.',
      )
    }
    this.#removed = true
    s.noteRemoved()
    // Until the removed session released its connection (it waits for its running uses),
    // the scope counts as open even once it ended, so scope.close() waits for it too.
    this.#removals++
    try {
      await s.close({ commit: false })
    } finally {
      if (--this.#removals === 0 && this.#ended) this.#scope.frameEnded(this)
    }
  }

  /**
   * End the scope: close its session (COMMIT when `commit` and nothing made it
   * rollback-only, else ROLLBACK), release the connection, and end the scope.
   * Runs once; later calls return the same promise. Rejects when a commit was
   * asked for and did not happen: COMMIT failed, the scope was aborted, or its
   * connection was taken by force.
   */
  end(opts: { commit: boolean }): Promise<SessionOutcome> {
    if (this.#ending) return this.#ending
    if (!this.#ended) {
      try {
        if (!this.endNow(opts.commit)) {
          this.#ending = this.#end(opts.commit)
          return this.#ending
        }
      } catch {
        // endNow() recorded the failure; it is this promise's rejection.
      }
    }
    this.#ending = this.#endFailure
      ? Promise.reject(this.#endFailure.error)
      : Promise.resolve(this.#endOutcome!)
    return this.#ending
  }

  /**
   * @internal `end()` at once, when its session (if any) has nothing to wait for
   * (see `Session.closeNow`): true when it ended, false (having done nothing)
   * when the caller must await `end()`. Throws what `end()` would reject with.
   * `run()` ends most scopes this way, without a promise of its own.
   */
  endNow(commit: boolean): boolean {
    if (this.#ending || this.#ended) return false
    const s = this.#session
    try {
      const outcome = s ? s.closeNow(commit) : 'empty'
      if (outcome === undefined) return false
      this.#checkCommitted(commit, s)
      this.#endOutcome = outcome
    } catch (e) {
      this.#endFailure = { error: e }
      this.#finishEnd()
      throw e
    }
    this.#finishEnd()
    return true
  }

  // A chain, not an async function: one promise less for every scope with a unit of work.
  // Only when endNow() could not end it, so there is a session (one without ends at once).
  #end(commit: boolean): Promise<SessionOutcome> {
    const s = this.#session as Session<C>
    return s.close({ commit }).then(
      (outcome) => {
        try {
          this.#checkCommitted(commit, s)
        } finally {
          this.#finishEnd()
        }
        return outcome
      },
      (e: unknown) => {
        this.#finishEnd()
        throw e
      },
    )
  }

  /** A commit was asked for: it must have happened. */
  #checkCommitted(commit: boolean, s: Session<C> | undefined): void {
    if (commit && this.aborted) throw this.aborted
    if (commit && s?.lostUnit) {
      throw new TransactionStateError(
        `The unit of work of '${this.name}' was not committed: ${s.closedReason}.`,
      )
    }
  }

  #finishEnd(): void {
    this.#ended = true
    if (this.#external && this.#onExternal) {
      this.#external.removeEventListener('abort', this.#onExternal)
    }
    if (this.#removals === 0) this.#scope.frameEnded(this)
  }
}

/**
 * The AsyncLocalStorage store while a `transaction(fn)`'s fn runs: its scope,
 * and which transaction. `getSession()` and `remove()` see the scope through it.
 */
class InTransaction<C> {
  constructor(
    readonly open: OpenScope<C>,
    readonly tx: object,
  ) {}

  current(call: string): Session<C> {
    return this.open.current(call)
  }

  get ended(): boolean {
    return this.open.ended
  }

  remove(): Promise<void> {
    return this.open.remove()
  }
}

let scopeCount = 0
/** More free AbortControllers than checkouts that wait at once would only hold memory. */
const maxFreeSignals = 64

/** @internal */
export class ScopeImpl<C> implements Scope<C> {
  readonly name: string
  readonly driver: Driver<C>
  readonly options: ResolvedOptions
  readonly als = new AsyncLocalStorage<OpenScope<C> | InTransaction<C>>()
  /** Aborted when close() begins (see #closeSignal). */
  #closeController: AbortController | undefined
  readonly core: ScopeCore<C>
  /** The open scopes: a list linked through OpenScope.prevOpen/nextOpen (newest first), and its length. */
  #openHead: OpenScope<C> | undefined
  #openCount = 0
  #holding = new Set<Session<C>>()
  #totals = { acquired: 0, destroyed: 0, leaks: 0 }
  #idle: (() => void) | undefined
  #closing: Promise<void> | undefined

  constructor(options: ScopeOptions<C>) {
    this.options = resolveOptions(options)
    this.driver = options.driver
    this.name = this.options.name
    const scope = this
    const totals = this.#totals
    const holding = this.#holding
    const signals: AbortController[] = []
    this.core = {
      name: this.name,
      idPrefix: `${++scopeCount > 1 ? `${scopeCount}.` : ''}`,
      driver: this.driver,
      options: this.options,
      closed: false,
      ended: false,
      waiting: 0,
      timeouts: 0,
      committed: 0,
      rolledBack: 0,
      forced: 0,
      deadlines: {
        // A checkout that waits keeps the process alive, as a pending setTimeout would.
        acquire: new Deadlines(this.options.acquireTimeoutMs, true),
        leak:
          this.options.leakDetectionMs > 0
            ? new Deadlines(this.options.leakDetectionMs, false)
            : undefined,
        hold: this.options.maxHoldMs > 0 ? new Deadlines(this.options.maxHoldMs, false) : undefined,
      },
      poolTimeout: (sessionName) =>
        new PoolTimeoutError(
          scope.name,
          sessionName,
          scope.options.acquireTimeoutMs,
          scope.#poolStats(),
          scope.holders(),
        ),
      acquired(session, waitMs) {
        totals.acquired++
        holding.add(session)
        if (channels.acquire.hasSubscribers) {
          channels.acquire.publish({ scope: scope.name, session, waitMs })
        }
      },
      released(session, conn, destroy, error, heldMs) {
        holding.delete(session)
        if (destroy) totals.destroyed++
        if (channels.release.hasSubscribers) {
          channels.release.publish({
            scope: scope.name,
            session,
            heldMs,
            destroyed: destroy,
            outcome: session.outcome,
            ...(error !== undefined && { error }),
          })
        }
        try {
          const r = scope.driver.release(conn, { destroy, ...(error !== undefined && { error }) })
          if (r && typeof (r as Promise<void>).catch === 'function') {
            ;(r as Promise<void>).catch((e) => scope.core.report(e, 'release', session))
          }
        } catch (e) {
          scope.core.report(e, 'release', session)
        }
      },
      giveBack(conn) {
        try {
          const r = scope.driver.release(conn, { destroy: false })
          if (r && typeof (r as Promise<void>).catch === 'function') {
            ;(r as Promise<void>).catch((e) => scope.core.report(e, 'release'))
          }
        } catch (e) {
          scope.core.report(e, 'release')
        }
      },
      signal() {
        return signals.pop() ?? new AbortController()
      },
      recycle(ac) {
        // A driver that kept a listener (or aborted it) may still act on it: never hand it out again.
        if (
          signals.length < maxFreeSignals &&
          !ac.signal.aborted &&
          getEventListeners(ac.signal, 'abort').length === 0
        ) {
          signals.push(ac)
        }
      },
      leak(session) {
        const h = session.holder(performance.now())
        if (!h) return
        totals.leaks++
        scope.options.logger.warn(
          `[scoped] Possible connection leak: session '${h.name}' (${h.id}${h.requestId !== undefined ? `, request ${h.requestId}` : ''}) of scope '${scope.name}' has held a connection for ${h.heldMs} ms (leakDetectionMs: ${scope.options.leakDetectionMs}), state ${h.state}.` +
            (h.stack
              ? `\nAcquired at:\n${h.stack}`
              : ' Set captureStacks: true to see where it was acquired.'),
        )
        if (channels.leak.hasSubscribers) {
          channels.leak.publish({ scope: scope.name, session, holder: h })
        }
      },
      report(error, during, session) {
        if (channels.error.hasSubscribers) {
          channels.error.publish({ scope: scope.name, session, error, during })
        }
        const onError = scope.options.onError
        try {
          if (onError) {
            onError(error, { during, ...(session && { session: session.name }) })
          } else {
            scope.options.logger.error(
              `[scoped] ${during} failed${session ? ` in session '${session.name}'` : ''} (scope '${scope.name}'):`,
              error,
            )
          }
        } catch (reportError) {
          // Reporting must never change an outcome (a COMMIT that happened, the error the
          // caller gets): a reporter that throws is said on stderr, with what it was reporting.
          console.error(
            `[scoped] the scope '${scope.name}' ${onError ? 'onError' : 'logger.error'} threw while reporting that ${during} failed:`,
            reportError,
            '\nwhat it was reporting:',
            error,
          )
        }
      },
    }
  }

  getSession(): Session<C> {
    const open = this.als.getStore()
    if (!open) throw new NoActiveScopeError(this.name, 'getSession()')
    return open.current('getSession()')
  }

  hasSession(): boolean {
    const open = this.als.getStore()
    return open !== undefined && !open.ended
  }

  open(opts: OpenOptions = {}): OpenScope<C> {
    validateRunOptions(opts, 'open', this.options.transaction)
    if (this.core.closed) throw new ScopeClosedError(this.name, 'open()')
    const open = new OpenScope(this, opts, opts.name ?? 'run')
    this.#link(open)
    return open
  }

  // Not an async function: returning #runIn's promise from one would cost three more
  // microtask turns per scope. Errors still reject, never throw.
  run<T>(fn: () => Promise<T>, opts: RunOptions = {}): Promise<T> {
    try {
      if (typeof fn !== 'function') {
        throw new TypeError(`run(fn): fn must be a function, got ${typeof fn}`)
      }
      validateRunOptions(opts, 'run', this.options.transaction)
      if (this.core.closed) throw new ScopeClosedError(this.name, 'run()')
      return this.#runIn(new OpenScope(this, opts, opts.name ?? 'run'), fn)
    } catch (e) {
      return Promise.reject(e)
    }
  }

  #runIn<T>(open: OpenScope<C>, fn: () => Promise<T>): Promise<T> {
    this.#link(open)
    let running: Promise<T>
    try {
      running = Promise.resolve(open.enter(fn))
    } catch (e) {
      return this.#rollBack(open, e)
    }
    // One promise for the whole scope when it ends at once (no transaction to commit, no
    // hooks): on Node 20 every promise costs more once an AsyncLocalStorage is active.
    return running.then(
      (result) => (open.endNow(true) ? result : open.end({ commit: true }).then(() => result)),
      (e: unknown) => this.#rollBack(open, e),
    )
  }

  async #rollBack(open: OpenScope<C>, error: unknown): Promise<never> {
    try {
      await open.end({ commit: false })
    } catch (closeErr) {
      this.core.report(closeErr, 'rollback', open.existingSession)
    }
    throw error
  }

  async runJob<T>(fn: () => Promise<T>, opts: JobOptions = {}): Promise<T> {
    if (typeof fn !== 'function')
      throw new TypeError(`runJob(fn): fn must be a function, got ${typeof fn}`)
    validateRunOptions(opts, 'runJob', this.options.transaction)
    const { timeoutMs } = opts
    if (timeoutMs !== undefined && !(Number.isFinite(timeoutMs) && timeoutMs > 0)) {
      throw new TypeError(
        `runJob(fn, { timeoutMs }): expected a finite number > 0, got ${timeoutMs}`,
      )
    }
    if (this.core.closed) throw new ScopeClosedError(this.name, 'runJob()')
    const name = `job:${opts.name ?? (fn.name || 'anonymous')}`
    const open = new OpenScope(this, { ...opts, kind: 'job' }, name)
    const timer =
      timeoutMs === undefined
        ? undefined
        : setTimeout(
            () => open.abort('timeout', { detail: `timeoutMs: ${timeoutMs}`, cancel: true }),
            timeoutMs,
          )
    try {
      return await this.#runIn(open, fn)
    } catch (e) {
      // The job's own failure after its timeout or its signal (usually the cancelled
      // statement) is a consequence: say that it was aborted, and keep what it threw as the cause.
      const aborted = open.aborted
      if (aborted !== undefined && e !== aborted) {
        if (aborted.kind === 'timeout') {
          throw new ScopeAbortedError(name, 'timeout', `timeoutMs: ${timeoutMs}`, { cause: e })
        }
        if (aborted.kind === 'signal')
          throw new ScopeAbortedError(name, 'signal', undefined, { cause: e })
      }
      throw e
    } finally {
      clearTimeout(timer)
    }
  }

  async loop(fn: () => Promise<void>, opts: LoopOptions): Promise<void> {
    if (typeof fn !== 'function')
      throw new TypeError(`loop(fn): fn must be a function, got ${typeof fn}`)
    if (typeof opts !== 'object' || opts === null) {
      throw new TypeError(
        'loop(fn, opts): opts is required, with at least a signal to stop the loop',
      )
    }
    const { signal, intervalMs = 0, backoff = {}, ...jobOpts } = opts
    if (!(signal instanceof AbortSignal)) {
      throw new TypeError(
        `loop(fn, { signal }): expected an AbortSignal to stop the loop, got ${typeof signal}. A loop without one can never stop cleanly.`,
      )
    }
    if (!(Number.isFinite(intervalMs) && intervalMs >= 0)) {
      throw new TypeError(
        `loop(fn, { intervalMs }): expected a finite number >= 0, got ${intervalMs}`,
      )
    }
    const initialMs = backoff.initialMs ?? 100
    const maxMs = backoff.maxMs ?? 30_000
    if (!(Number.isFinite(initialMs) && initialMs >= 0)) {
      throw new TypeError(
        `loop(fn, { backoff: { initialMs } }): expected a finite number >= 0, got ${initialMs}`,
      )
    }
    if (!(Number.isFinite(maxMs) && maxMs >= initialMs)) {
      throw new TypeError(
        `loop(fn, { backoff: { maxMs } }): expected a finite number >= initialMs, got ${maxMs}`,
      )
    }
    let failures = 0
    const name = jobOpts.name ?? (fn.name || 'loop')
    while (!signal.aborted && !this.core.closed) {
      try {
        // The loop's signal stops the loop, not the iteration: the current job finishes.
        await this.runJob(fn, { ...jobOpts, name })
        failures = 0
        if (intervalMs > 0) await pause(intervalMs, signal, this.#closeSignal())
      } catch (e) {
        if (e instanceof ScopeClosedError) break
        failures++
        this.core.report(e, `loop iteration (job:${name}, failure ${failures} in a row)`)
        await pause(Math.min(maxMs, initialMs * 2 ** (failures - 1)), signal, this.#closeSignal())
      }
    }
  }

  async remove(): Promise<void> {
    const open = this.als.getStore()
    if (!open) throw new NoActiveScopeError(this.name, 'remove()')
    await open.remove()
  }

  stats(): ScopeStats {
    let inTransaction = 0
    for (const s of this.#holding) if (s.inTransaction) inTransaction++
    return {
      name: this.name,
      driver: this.driver.name,
      open: this.#openCount,
      holding: this.#holding.size,
      inTransaction,
      waiting: this.core.waiting,
      totals: {
        acquired: this.#totals.acquired,
        committed: this.core.committed,
        rolledBack: this.core.rolledBack,
        destroyed: this.#totals.destroyed,
        leaks: this.#totals.leaks,
        timeouts: this.core.timeouts,
        forced: this.core.forced,
      },
      pool: this.#poolStats(),
    }
  }

  holders(): Holder[] {
    const now = performance.now()
    const list: Holder[] = []
    for (const s of this.#holding) {
      const h = s.holder(now)
      if (h) list.push(h)
    }
    return list.sort((a, b) => b.heldMs - a.heldMs)
  }

  close(opts: { timeoutMs?: number } = {}): Promise<void> {
    const timeoutMs = opts.timeoutMs ?? 10_000
    if (!(Number.isFinite(timeoutMs) && timeoutMs >= 0)) {
      throw new TypeError(`close({ timeoutMs }): expected a finite number >= 0, got ${timeoutMs}`)
    }
    this.#closing ??= this.#close(timeoutMs).finally(() => {
      // The default scope stays the default until it closed: the requests and jobs it
      // waits for still call the top-level getSession(). Then the top-level functions
      // speak of it as closed, until another default scope is made.
      if (defaultScope === this) {
        defaultScope = undefined
        closedDefaultScope = this
      }
    })
    return this.#closing
  }

  /** Aborted when close() begins: a loop() pausing between runs ends at once. Made when first asked for. */
  #closeSignal(): AbortSignal {
    this.#closeController ??= new AbortController()
    if (this.core.closed) this.#closeController.abort()
    return this.#closeController.signal
  }

  async #close(timeoutMs: number): Promise<void> {
    this.core.closed = true
    this.#closeController?.abort()
    if (this.#openCount > 0) {
      let timer: NodeJS.Timeout | undefined
      await Promise.race([
        new Promise<void>((resolve) => {
          this.#idle = resolve
        }),
        new Promise<void>((resolve) => {
          timer = setTimeout(resolve, timeoutMs)
        }),
      ])
      clearTimeout(timer)
    }
    this.core.ended = true
    const stillOpen: OpenScope<C>[] = []
    for (let open = this.#openHead; open; open = open.nextOpen) stillOpen.push(open)
    for (const open of stillOpen) open.abort('shutdown', { cancel: true })
    for (const s of [...this.#holding]) {
      this.core.forced++
      s.forceRelease(
        `its connection was destroyed because scope.close() timed out after ${timeoutMs} ms`,
      )
    }
    await this.driver.end?.()
  }

  /** @internal */
  frameEnded(open: OpenScope<C>): void {
    const { prevOpen, nextOpen } = open
    if (prevOpen) prevOpen.nextOpen = nextOpen
    else if (this.#openHead === open) this.#openHead = nextOpen
    else return // not in the list
    if (nextOpen) nextOpen.prevOpen = prevOpen
    open.prevOpen = undefined
    open.nextOpen = undefined
    if (--this.#openCount === 0 && this.#idle) this.#idle()
  }

  #link(open: OpenScope<C>): void {
    const head = this.#openHead
    if (head) head.prevOpen = open
    open.nextOpen = head
    this.#openHead = open
    this.#openCount++
  }

  #poolStats(): PoolStats | undefined {
    try {
      return this.driver.poolStats?.()
    } catch {
      return undefined
    }
  }
}

/** Wait `ms`, or until `signal` (the loop's) or `closing` (its scope's close()) aborts. */
function pause(ms: number, signal: AbortSignal, closing: AbortSignal): Promise<void> {
  if (ms <= 0 || signal.aborted || closing.aborted) return Promise.resolve()
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(t)
      signal.removeEventListener('abort', done)
      closing.removeEventListener('abort', done)
      resolve()
    }
    const t = setTimeout(done, ms)
    signal.addEventListener('abort', done, { once: true })
    closing.addEventListener('abort', done, { once: true })
  })
}

function validateRunOptions(
  opts: RunOptions | OpenOptions,
  call: string,
  scopeMode: TransactionMode,
): void {
  if (typeof opts !== 'object' || opts === null) {
    throw new TypeError(
      `${call}(fn, opts): opts must be an object, got ${opts === null ? 'null' : typeof opts}`,
    )
  }
  const lazyName = call === 'open' && typeof opts.name === 'function'
  if (opts.name !== undefined && !lazyName && (typeof opts.name !== 'string' || opts.name === '')) {
    throw new TypeError(
      `${call}(fn, { name }): expected a non-empty string, got ${typeof opts.name}`,
    )
  }
  const onSession = (opts as OpenOptions).onSession
  if (onSession !== undefined && (call !== 'open' || typeof onSession !== 'function')) {
    throw new TypeError(
      `${call}(fn, { onSession }): ${call === 'open' ? `expected a function, got ${typeof onSession}` : 'only open() takes it'}`,
    )
  }
  if (opts.signal !== undefined && !(opts.signal instanceof AbortSignal)) {
    throw new TypeError(
      `${call}(fn, { signal }): expected an AbortSignal, got ${typeof opts.signal}`,
    )
  }
  if (
    opts.transaction !== undefined &&
    opts.transaction !== 'auto' &&
    opts.transaction !== 'none'
  ) {
    throw new TypeError(
      `${call}(fn, { transaction }): expected 'auto' or 'none', got ${JSON.stringify(opts.transaction)}`,
    )
  }
  if (opts.release !== undefined) {
    if (opts.release !== 'end' && opts.release !== 'idle') {
      throw new TypeError(
        `${call}(fn, { release }): expected 'end' or 'idle', got ${JSON.stringify(opts.release)}`,
      )
    }
    if (opts.release === 'idle' && (opts.transaction ?? scopeMode) !== 'none') {
      throw new TypeError(
        `${call}(fn, { release: 'idle' }): needs transaction: 'none' (this run's mode is 'auto', whose ` +
          "transaction holds the connection until the end). Fix: pass transaction: 'none' too.",
      )
    }
  }
}

/** @internal The scope that top-level `getSession()` & co. use. */
export let defaultScope: ScopeImpl<any> | undefined
/**
 * @internal The default scope that closed, until another is made: the top-level
 * functions answer as it does (`ScopeClosedError`, `NoActiveScopeError`) rather
 * than "there is no default scope".
 */
export let closedDefaultScope: ScopeImpl<any> | undefined

/**
 * Create a scope over a driver.
 *
 * @example
 * ```ts
 * import { createScope } from '@scoped/core'
 * import { pgDriver } from '@scoped/pg'
 *
 * // pool: the application's node-postgres pool (new Pool({ max: 10 }))
 * export const scope = createScope({ driver: pgDriver(pool), name: 'main' })
 * ```
 */
export function createScope<C>(options: ScopeOptions<C>): Scope<C> {
  const scope = new ScopeImpl(options)
  if (scope.options.default) {
    if (defaultScope) {
      throw new Error(
        `createScope({ name: '${scope.name}' }): the default scope is already '${defaultScope.name}'` +
          (defaultScope.core.closed
            ? ', and it is still closing (the top-level getSession() of the work it waits for is still its). Await its close() first.'
            : '. Pass default: false for every scope after the first (and use its own getSession()), or close the first one.'),
      )
    }
    defaultScope = scope
    closedDefaultScope = undefined
  }
  return scope
}
