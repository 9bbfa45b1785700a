import type { Driver } from './driver.js'
import type { ReleaseMode, TransactionMode } from './session.js'

/** Where the scope reports what it cannot throw: hook errors, leaks, failed releases. */
export interface Logger {
  warn(message: string): void
  error(message: string, error?: unknown): void
}

export interface ScopeOptions<C> {
  /** How connections are checked out and transactions run: `pgDriver(pool)`, `kyselyDriver(dialect)`, … */
  driver: Driver<C>
  /** The pool's name in stats, metrics and error messages. Default: the driver's name. */
  name?: string
  /** `'auto'` (default): every session is a unit of work in one transaction. `'none'`: autocommit. */
  transaction?: TransactionMode
  /**
   * When a session gives its connection back. `'end'` (default): when its
   * request or job ends. `'idle'` (with `transaction: 'none'` only): as soon as
   * no statement runs and no `transaction(fn)` is open, as `pool.query()` does;
   * the next statement checks one out again, maybe another one.
   */
  release?: ReleaseMode
  /** How long a session waits for a pooled connection before `PoolTimeoutError`. Default 30 000; never infinite. */
  acquireTimeoutMs?: number
  /** Warn (with the holder and its acquisition stack) when a connection is held longer. Default 60 000; 0 = off. */
  leakDetectionMs?: number
  /** Destroy a connection held longer than this, even under running work. Default 0 = off. */
  maxHoldMs?: number
  /** Record the stack at checkout (holders, leak warnings, timeouts). Default: `NODE_ENV !== 'production'`. */
  captureStacks?: boolean
  /** `getSession()`/`runJob()`/… without a scope use this scope. Default true; one default scope at a time. */
  default?: boolean
  /** Called with errors that have nowhere to be thrown (hooks, releases, loop iterations). Default: `logger.error`. */
  onError?: (error: unknown, context: { during: string; session?: string }) => void
  /** Default: `console`. */
  logger?: Logger
}

export interface ResolvedOptions {
  name: string
  transaction: TransactionMode
  release: ReleaseMode
  acquireTimeoutMs: number
  leakDetectionMs: number
  maxHoldMs: number
  captureStacks: boolean
  default: boolean
  onError: ScopeOptions<unknown>['onError']
  logger: Logger
}

const known = new Set([
  'driver',
  'name',
  'transaction',
  'release',
  'acquireTimeoutMs',
  'leakDetectionMs',
  'maxHoldMs',
  'captureStacks',
  'default',
  'onError',
  'logger',
])

function describe(v: unknown): string {
  if (typeof v === 'number' || typeof v === 'string') return JSON.stringify(v) ?? String(v)
  return v === null ? 'null' : typeof v
}

function duration(opts: Record<string, unknown>, key: string, dflt: number, min: number): number {
  const v = opts[key]
  if (v === undefined) return dflt
  if (typeof v !== 'number' || !Number.isFinite(v) || v < min) {
    throw new TypeError(
      `createScope({ ${key} }): expected a finite number of milliseconds >= ${min}, got ${describe(v)}`,
    )
  }
  return v
}

function flag(opts: Record<string, unknown>, key: string, dflt: boolean): boolean {
  const v = opts[key]
  if (v === undefined) return dflt
  if (typeof v !== 'boolean')
    throw new TypeError(`createScope({ ${key} }): expected a boolean, got ${describe(v)}`)
  return v
}

/** Check every option and fill in defaults; a wrong one is a TypeError naming it, before anything starts. */
export function resolveOptions<C>(options: ScopeOptions<C>): ResolvedOptions {
  if (typeof options !== 'object' || options === null) {
    throw new TypeError(
      `createScope(options): expected an object with a driver, got ${describe(options)}`,
    )
  }
  const o = options as unknown as Record<string, unknown>
  for (const key of Object.keys(o)) {
    if (!known.has(key)) {
      throw new TypeError(
        `createScope({ ${key} }): unknown option. Known options: ${[...known].join(', ')}`,
      )
    }
  }
  const driver = options.driver as unknown as Record<string, unknown> | undefined
  if (typeof driver !== 'object' || driver === null) {
    throw new TypeError(
      `createScope({ driver }): expected a Driver object, got ${describe(driver)}`,
    )
  }
  for (const fn of ['acquire', 'release']) {
    if (typeof driver[fn] !== 'function') {
      throw new TypeError(
        `createScope({ driver }): driver.${fn} must be a function, got ${describe(driver[fn])}`,
      )
    }
  }
  if (typeof driver.name !== 'string' || driver.name === '') {
    throw new TypeError(
      `createScope({ driver }): driver.name must be a non-empty string, got ${describe(driver.name)}`,
    )
  }
  const transaction = o.transaction ?? 'auto'
  if (transaction !== 'auto' && transaction !== 'none') {
    throw new TypeError(
      `createScope({ transaction }): expected 'auto' or 'none', got ${describe(transaction)}`,
    )
  }
  if (transaction === 'auto') {
    for (const fn of ['begin', 'commit', 'rollback']) {
      if (typeof driver[fn] !== 'function') {
        throw new TypeError(
          `createScope({ transaction: 'auto' }): driver '${driver.name}' has no ${fn}(), so it cannot run a unit of work. Use transaction: 'none'.`,
        )
      }
    }
  }
  const release = o.release ?? 'end'
  if (release !== 'end' && release !== 'idle') {
    throw new TypeError(
      `createScope({ release }): expected 'end' or 'idle', got ${describe(release)}`,
    )
  }
  if (release === 'idle' && transaction !== 'none') {
    throw new TypeError(
      "createScope({ release: 'idle' }): needs transaction: 'none'. In 'auto' mode the unit of " +
        "work's transaction holds the connection until the request or job ends. Fix: add " +
        "transaction: 'none', or remove release.",
    )
  }
  const name = o.name ?? driver.name
  if (typeof name !== 'string' || name === '') {
    throw new TypeError(`createScope({ name }): expected a non-empty string, got ${describe(name)}`)
  }
  if (o.onError !== undefined && typeof o.onError !== 'function') {
    throw new TypeError(`createScope({ onError }): expected a function, got ${describe(o.onError)}`)
  }
  const logger = (o.logger ?? console) as Logger
  if (typeof logger.warn !== 'function' || typeof logger.error !== 'function') {
    throw new TypeError('createScope({ logger }): expected an object with warn() and error()')
  }
  return Object.freeze({
    name,
    transaction,
    release,
    acquireTimeoutMs: duration(o, 'acquireTimeoutMs', 30_000, 1),
    leakDetectionMs: duration(o, 'leakDetectionMs', 60_000, 0),
    maxHoldMs: duration(o, 'maxHoldMs', 0, 0),
    captureStacks: flag(o, 'captureStacks', process.env.NODE_ENV !== 'production'),
    default: flag(o, 'default', true),
    onError: options.onError,
    logger,
  })
}
