/**
 * `scopedPool(scope)`: the `query()` of a `pg.Pool`, routed to the current
 * session, so code written against `pool.query(...)` joins the request's unit
 * of work without change.
 */
import type { Scope } from '@scoped/core'
import { NoActiveScopeError } from '@scoped/core'
import type pg from 'pg'

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
 */
const tails = new WeakMap<pg.PoolClient, Promise<unknown>>()

/**
 * Run `fn` on `client` after every statement already queued on it by this library.
 * A pipelined client (`new pg.Pool({ pipeline: true })`) queues statements itself,
 * in order, and sends them without waiting for the previous result: `fn` runs at once.
 */
export function serial<T>(client: pg.PoolClient, fn: () => Promise<T>): Promise<T> {
  if ((client as { pipeline?: boolean }).pipeline === true) return fn()
  const tail = tails.get(client)
  const run = tail ? tail.then(fn, fn) : fn()
  // One promise marks the end of this statement and forgets the tail if nothing queued behind it.
  const settled: Promise<void> = run.then(forget, forget)
  function forget(): void {
    if (tails.get(client) === settled) tails.delete(client)
  }
  tails.set(client, settled)
  return run
}

function isQueryText(text: unknown): boolean {
  if (typeof text === 'string') return true
  if (typeof text !== 'object' || text === null) return false
  const t = text as { text?: unknown; submit?: unknown }
  // A QueryConfig has a text; a Submittable (pg-cursor, pg-query-stream) brings its own.
  return typeof t.text === 'string' || typeof t.submit === 'function'
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
      if (typeof values === 'function' || typeof callback === 'function') {
        return Promise.reject(
          new TypeError(
            'scopedPool.query(): callbacks are not supported; use the returned promise',
          ),
        )
      }
      // Checked before the session checks a connection out: pg would only fail after it.
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
      return session.use((client) => serial(client, () => client.query(text, values)))
    },
  }) as ScopedPool
}
