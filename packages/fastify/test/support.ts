/**
 * What every Fastify test needs: a fresh database, a pg.Pool behind a scope
 * (not the default one), a count of releases from the `scoped:release`
 * diagnostics channel, real HTTP requests over real sockets, and the check
 * every test ends with (nothing open, nothing held, the pool fully idle).
 */
import dc from 'node:diagnostics_channel'
import http from 'node:http'
import { createScope, type Scope, type ScopeOptions } from '@scoped/core'
import { pgDriver, type ScopedPool, scopedPool } from '@scoped/pg'
import type { FastifyInstance } from 'fastify'
import pg from 'pg'
import { expect } from 'vitest'
import { testDatabase } from '../../../test/support/db.ts'

export interface Harness {
  url: string
  pool: pg.Pool
  scope: Scope<pg.PoolClient>
  db: ScopedPool
  /** application_name of the pool's backends, to find them in pg_stat_activity. */
  app: string
  /** Connections given back (or destroyed) so far, from `scoped:release`. */
  releases(): number
  /** A plain client on its own connection: sees only committed rows. */
  independent: pg.Client
  close(): Promise<void>
}

export async function harness(
  name: string,
  opts: { max?: number; scope?: Partial<ScopeOptions<pg.PoolClient>> } = {},
): Promise<Harness> {
  const url = await testDatabase(name)
  const app = `fastify_${name}`.slice(0, 63)
  const pool = new pg.Pool({ connectionString: url, max: opts.max ?? 5, application_name: app })
  const scope = createScope({ driver: pgDriver(pool), name, default: false, ...opts.scope })
  let released = 0
  const onRelease = (msg: unknown) => {
    if ((msg as { scope: string }).scope === name) released++
  }
  dc.subscribe('scoped:release', onRelease)
  const independent = new pg.Client({ connectionString: url })
  await independent.connect()
  return {
    url,
    pool,
    scope,
    db: scopedPool(scope),
    app,
    releases: () => released,
    independent,
    async close() {
      dc.unsubscribe('scoped:release', onRelease)
      await independent.end()
      await scope.close()
    },
  }
}

/** Listen on a free port of 127.0.0.1; returns the base URL and the port. */
export async function listen(app: FastifyInstance): Promise<{ base: string; port: number }> {
  const base = await app.listen({ port: 0, host: '127.0.0.1' })
  return { base, port: Number(new URL(base).port) }
}

/** Wait until `check()` is true, polling; throws with `what` if it never is within `ms`. */
export async function waitFor(what: string, check: () => boolean | Promise<boolean>, ms = 10_000) {
  const deadline = Date.now() + ms
  for (;;) {
    if (await check()) return
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 5))
  }
}

/** Wait until no request scope is open, then check that nothing is held and the pool is fully idle. */
export async function expectSettled(h: Harness): Promise<void> {
  await waitFor('every request scope to end', () => {
    const s = h.scope.stats()
    return s.open === 0 && s.holding === 0 && h.pool.totalCount === h.pool.idleCount
  })
  expect(h.scope.holders()).toEqual([])
  expect({
    total: h.pool.totalCount,
    idle: h.pool.idleCount,
    waiting: h.pool.waitingCount,
  }).toEqual({
    total: h.pool.idleCount,
    idle: h.pool.idleCount,
    waiting: 0,
  })
  const stuck = await h.independent.query(
    "SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = $1 AND state LIKE 'idle in transaction%'",
    [h.app],
  )
  expect(stuck.rows[0].n).toBe(0)
}

/** A promise and its resolve. */
export function gate<T = void>(): { promise: Promise<T>; open: (value: T) => void } {
  let open!: (value: T) => void
  const promise = new Promise<T>((r) => {
    open = r
  })
  return { promise, open }
}

export interface RawResponse {
  status: number
  headers: http.IncomingHttpHeaders
  body: string
}

/**
 * A request on its own socket (no keep-alive), so a test can cut it off:
 * `abort()` destroys the socket, as a client that goes away does.
 */
export function send(
  port: number,
  opts: {
    method?: string
    path: string
    headers?: Record<string, string | number>
    body?: string | Buffer
  },
): { response: Promise<RawResponse>; request: http.ClientRequest; abort: () => void } {
  const request = http.request({
    host: '127.0.0.1',
    port,
    method: opts.method ?? 'GET',
    path: opts.path,
    headers: opts.headers,
    agent: false,
  })
  const response = new Promise<RawResponse>((resolve, reject) => {
    request.on('error', reject)
    request.on('response', (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('error', reject)
      res.on('aborted', () => reject(new Error('response aborted')))
      res.on('end', () => {
        resolve({
          status: res.statusCode ?? 0,
          headers: res.headers,
          body: Buffer.concat(chunks).toString(),
        })
      })
    })
  })
  if (opts.body !== undefined) request.end(opts.body)
  else if (!opts.headers?.['content-length']) request.end()
  return {
    response,
    request,
    abort: () => {
      request.destroy()
    },
  }
}

/** Rows of `sql`, read on the independent connection (only committed rows). */
export async function committed<R extends pg.QueryResultRow = any>(
  h: Harness,
  sql: string,
  params: unknown[] = [],
): Promise<R[]> {
  return (await h.independent.query<R>(sql, params)).rows
}
