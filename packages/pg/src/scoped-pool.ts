/**
 * `scopedPool(scope)`: the `query()` of a `pg.Pool`, routed to the current
 * session, so code written against `pool.query(...)` joins the request's unit
 * of work without change.
 */
import { AsyncResource } from 'node:async_hooks'
import type { Scope } from '@scoped/core'
import { NoActiveScopeError } from '@scoped/core'
import type pg from 'pg'
import { explainStatementError } from './errors.js'

export interface ScopedPoolOptions {
  /**
   * Outside any scope: `'throw'` (default) raises `NoActiveScopeError`;
   * `'pool'` runs the query on the pool directly, as plain pg would (autocommit).
   */
  outsideScope?: 'throw' | 'pool'
  /** The pool to use outside a scope with `outsideScope: 'pool'`. */
  pool?: pg.Pool
}

export interface ScopedPool {
  /** `pool.query({ text, rowMode: 'array' })`: rows as arrays, as pg.Pool types it. */
  query<R extends any[] = any[], I extends unknown[] = unknown[]>(
    queryConfig: pg.QueryArrayConfig<I>,
    values?: I,
  ): Promise<pg.QueryArrayResult<R>>
  /** `pool.query()`'s signature; runs on the current session's connection, one statement at a time. */
  query<R extends pg.QueryResultRow = any, I extends unknown[] = unknown[]>(
    queryTextOrConfig: string | pg.QueryConfig<I>,
    values?: I,
  ): Promise<pg.QueryResult<R>>
  /** The scope this pool routes to. */
  readonly scope: Scope<pg.PoolClient>
}

/**
 * Statements of one session go to its connection one after another: node-postgres
 * deprecates queueing a query while another runs, and ordering must stay the caller's.
 * Per client: absent when nothing of ours runs on it, `busy` while one statement runs,
 * or the statements waiting behind the running one, in order.
 */
const queues = new WeakMap<pg.PoolClient, typeof busy | (() => void)[]>()
const busy = 0

function isPipelined(client: pg.PoolClient): boolean {
  return (client as { pipeline?: boolean }).pipeline === true
}

/**
 * Run `start` now if nothing of ours runs on `client`, else after what is queued.
 * A queued one is bound to its caller's async context: it is started from the
 * previous statement's end (pg's callback, run in the context the connection's
 * socket was made in), and whatever reads AsyncLocalStorage when the statement
 * is sent (tracing, loggers, getSession()) must see its caller's.
 */
function inTurn(client: pg.PoolClient, start: () => void): void {
  const q = queues.get(client)
  if (q === undefined) {
    queues.set(client, busy)
    start()
  } else if (q === busy) queues.set(client, [AsyncResource.bind(start)])
  else q.push(AsyncResource.bind(start))
}

/** The running statement ended: start the next one, or mark the client free. */
function turnEnded(client: pg.PoolClient): void {
  const q = queues.get(client)
  if (q === undefined || q === busy) {
    queues.delete(client)
    return
  }
  const next = q.shift()!
  if (q.length === 0) queues.set(client, busy)
  next()
}

/**
 * Run `fn` on `client` after every statement already queued on it by this library.
 * A pipelined client (`new pg.Pool({ pipeline: true })`) queues statements itself,
 * in order, and sends them without waiting for the previous result: `fn` runs at once.
 */
export function serial<T>(client: pg.PoolClient, fn: () => Promise<T>): Promise<T> {
  if (isPipelined(client)) {
    try {
      return fn()
    } catch (e) {
      return Promise.reject(e)
    }
  }
  // `fn` in its turn: its end (or a synchronous throw) frees the client for the next one.
  // A rejection, never a throw, on both paths (the client free or not).
  const start = (): Promise<T> => {
    let run: Promise<T>
    try {
      run = fn()
      if (typeof (run as { then?: unknown } | null | undefined)?.then !== 'function') {
        // e.g. pg's query(config) with a callback in the config: pg answers through the
        // callback and returns undefined, and nothing would ever free the client.
        throw new TypeError(
          `serial(client, fn): fn must return the statement's promise, got ${run === null ? 'null' : typeof run}`,
        )
      }
    } catch (e) {
      turnEnded(client)
      return Promise.reject(e)
    }
    const ended = () => turnEnded(client)
    run.then(ended, ended)
    return run
  }
  if (queues.get(client) === undefined) {
    queues.set(client, busy)
    return start()
  }
  return new Promise<T>((resolve, reject) => {
    inTurn(client, () => {
      start().then(resolve, reject)
    })
  })
}

/**
 * `client.query(text, values)` in its turn (see `serial`), through pg's callback
 * form: one promise per statement, where the promise form and a reaction to free
 * the client make three (each one costs an AsyncLocalStorage hook's fields on Node 20).
 */
function queryInTurn(
  client: pg.PoolClient,
  text: string | pg.QueryConfig,
  values: unknown[] | undefined,
): Promise<pg.QueryResult> {
  if (isPipelined(client)) return client.query(text as string, values)
  // pg releases before brianc/node-postgres#3720 (July 2026) write the callback into a config
  // object they are given, and a later promise-style query of the same object would then return undefined:
  // config objects take the promise form.
  if (typeof text !== 'string') {
    return serial(client, () => client.query(text, values)).catch((e: unknown) => {
      throw explainStatementError(client, e)
    })
  }
  return new Promise((resolve, reject) => {
    inTurn(client, () => {
      try {
        client.query(
          text as string,
          values as unknown[],
          (err: Error | undefined, result: pg.QueryResult) => {
            turnEnded(client)
            if (err) reject(explainStatementError(client, err))
            else resolve(result)
          },
        )
      } catch (e) {
        turnEnded(client)
        reject(explainStatementError(client, e))
      }
    })
  })
}

function isQueryText(text: unknown): boolean {
  if (typeof text === 'string') return true
  if (typeof text !== 'object' || text === null) return false
  return typeof (text as { text?: unknown }).text === 'string'
}

function isSubmittable(text: unknown): boolean {
  return typeof (text as { submit?: unknown } | null)?.submit === 'function'
}

/**
 * @example
 * ```ts
 * const db = scopedPool(scope)
 * app.get('/orders/:id', async (c) => {
 *   const { rows } = await db.query('SELECT * FROM orders WHERE id = $1', [c.req.param('id')])
 *   return c.json(rows[0])
 * })
 * ```
 */
export function scopedPool(
  scope: Scope<pg.PoolClient>,
  options: ScopedPoolOptions = {},
): ScopedPool {
  if (typeof scope !== 'object' || scope === null || typeof scope.getSession !== 'function') {
    throw new TypeError(
      `scopedPool(scope): expected a Scope from createScope(), got ${scope === null ? 'null' : typeof scope}`,
    )
  }
  if (typeof options !== 'object' || options === null) {
    throw new TypeError(
      `scopedPool(scope, options): expected an object, got ${options === null ? 'null' : typeof options}`,
    )
  }
  for (const key of Object.keys(options)) {
    if (key !== 'outsideScope' && key !== 'pool') {
      throw new TypeError(
        `scopedPool(scope, { ${key} }): unknown option. Known options: outsideScope, pool`,
      )
    }
  }
  const outsideScope = options.outsideScope ?? 'throw'
  if (outsideScope !== 'throw' && outsideScope !== 'pool') {
    throw new TypeError(
      `scopedPool(scope, { outsideScope }): expected 'throw' or 'pool', got ${JSON.stringify(outsideScope)}`,
    )
  }
  if (outsideScope === 'pool' && !options.pool) {
    throw new TypeError(
      "scopedPool(scope, { outsideScope: 'pool' }): pass the pool too: { outsideScope: 'pool', pool }",
    )
  }
  if (
    options.pool !== undefined &&
    typeof (options.pool as { query?: unknown } | null)?.query !== 'function'
  ) {
    throw new TypeError(
      `scopedPool(scope, { pool }): expected a pg.Pool, got ${options.pool === null ? 'null' : typeof options.pool}`,
    )
  }
  return Object.freeze({
    scope,
    query(text: any, values?: any, callback?: unknown): Promise<any> {
      if (
        typeof values === 'function' ||
        typeof callback === 'function' ||
        typeof (text as { callback?: unknown } | null)?.callback === 'function'
      ) {
        return Promise.reject(
          new TypeError(
            'scopedPool.query(): callbacks are not supported (as an argument or as config.callback); use the returned promise',
          ),
        )
      }
      // Checked before the session checks a connection out: pg would only fail after it.
      if (isSubmittable(text)) {
        // Its end is an event of its own, not a promise: the session could not tell when the
        // statement is over, so neither release nor ordering could be kept.
        return Promise.reject(
          new TypeError(
            'scopedPool.query(submittable): pg-cursor and pg-query-stream objects are not supported by scopedPool. ' +
              'Fix: read them inside getSession().use(async (client) => { const cursor = client.query(new Cursor(sql)); ' +
              '/* read */; await cursor.close() }), which keeps the connection until fn returns.',
          ),
        )
      }
      if (!isQueryText(text)) {
        return Promise.reject(
          new TypeError(
            `scopedPool.query(text): expected SQL text or a query config with a text, got ${text === null ? 'null' : typeof text}`,
          ),
        )
      }
      let session: ReturnType<typeof scope.getSession>
      try {
        session = scope.getSession()
      } catch (e) {
        if (!(e instanceof NoActiveScopeError)) return Promise.reject(e)
        if (outsideScope === 'pool') return options.pool!.query(text, values)
        return Promise.reject(new NoActiveScopeError(scope.name, 'scopedPool.query()'))
      }
      return session.use((client) => queryInTurn(client, text, values))
    },
  }) as ScopedPool
}
