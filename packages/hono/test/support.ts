/**
 * What every @scoped/hono test needs: a real server on 127.0.0.1:0, a real
 * database scope, raw client sockets, and a tally of checkouts/releases per
 * request (from the `scoped:acquire`/`scoped:release` diagnostics channels).
 */
import dc from 'node:diagnostics_channel'
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import { serve } from '@hono/node-server'
import { createScope, type Scope, type ScopeOptions } from '@scoped/core'
import { pgDriver, type ScopedPool, scopedPool } from '@scoped/pg'
import type { Hono } from 'hono'
import pg from 'pg'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'

export { independentQuery }

export interface Db {
  url: string
  pool: pg.Pool
  scope: Scope<pg.PoolClient>
  db: ScopedPool
  /** Every error the scope reported (hook errors, failed commits of streamed responses, …). */
  reported: { error: unknown; during: string }[]
  close(): Promise<void>
}

/** A fresh database, a pool and a non-default scope over it. */
export async function database(
  name: string,
  opts: { max?: number; setup?: string; scope?: Partial<ScopeOptions<pg.PoolClient>> } = {},
): Promise<Db> {
  const url = await testDatabase(name)
  if (opts.setup) await independentQuery(url, opts.setup)
  const pool = new pg.Pool({ connectionString: url, max: opts.max ?? 10 })
  const reported: Db['reported'] = []
  const scope = createScope({
    driver: pgDriver(pool, { applicationName: 'auto' }),
    name,
    default: false,
    onError: (error, { during }) => reported.push({ error, during }),
    ...opts.scope,
  })
  return {
    url,
    pool,
    scope,
    db: scopedPool(scope),
    reported,
    close: () => scope.close({ timeoutMs: 5_000 }),
  }
}

export interface Running {
  url: string
  port: number
  server: http.Server
  close(): Promise<void>
}

/** `serve()` from @hono/node-server on a free loopback port. */
export function listen(app: Hono<any>, serverOptions?: http.ServerOptions): Promise<Running> {
  return serveFetch(app.fetch, serverOptions)
}

/** `serve({ fetch })` on a free loopback port: for `scopedFetch(app)`. */
export function serveFetch(
  fetch: (request: Request, env: any) => unknown,
  serverOptions?: http.ServerOptions,
): Promise<Running> {
  return new Promise((resolve) => {
    const server = serve(
      {
        fetch,
        port: 0,
        hostname: '127.0.0.1',
        ...(serverOptions && { serverOptions }),
      },
      () => {
        const port = (server.address() as AddressInfo).port
        resolve({
          url: `http://127.0.0.1:${port}`,
          port,
          server: server as http.Server,
          close: () =>
            new Promise<void>((done) => {
              ;(server as http.Server).closeAllConnections()
              server.close(() => done())
            }),
        })
      },
    ) as http.Server
  })
}

interface Event {
  requestId: string | undefined
  name: string
  destroyed?: boolean
}

/**
 * Count checkouts and releases of one scope, per request id (the `x-test-id`
 * header), or per session name (`by: 'name'`: scopedFetch() has no Context
 * for hono/request-id to set an id on, so its tests name sessions after it).
 */
export function tally(scopeName: string, by: 'requestId' | 'name' = 'requestId') {
  const acquires: Event[] = []
  const releases: Event[] = []
  const key = (m: any) => (by === 'name' ? m.session.name : m.session.requestId)
  const onAcquire = (m: any) => {
    if (m.scope === scopeName) acquires.push({ requestId: key(m), name: m.session.name })
  }
  const onRelease = (m: any) => {
    if (m.scope === scopeName) {
      releases.push({
        requestId: key(m),
        name: m.session.name,
        destroyed: m.destroyed,
      })
    }
  }
  dc.subscribe('scoped:acquire', onAcquire)
  dc.subscribe('scoped:release', onRelease)
  return {
    acquires,
    releases,
    releasesOf: (id: string) => releases.filter((e) => e.requestId === id).length,
    acquiresOf: (id: string) => acquires.filter((e) => e.requestId === id).length,
    stop() {
      dc.unsubscribe('scoped:acquire', onAcquire)
      dc.unsubscribe('scoped:release', onRelease)
    },
  }
}

/** Poll until `cond` holds; fail with `what` after `timeoutMs` (a bound, not a measurement). */
export async function until(
  cond: () => boolean | Promise<boolean>,
  what: string,
  timeoutMs = 15_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for: ${what}`)
    await new Promise((r) => setTimeout(r, 5))
  }
}

/** Wait until every request scope ended, then the pool must be fully idle. */
export async function settled(d: Db): Promise<void> {
  await until(() => d.scope.stats().open === 0, 'every request scope ended')
  await until(
    () => d.pool.totalCount === d.pool.idleCount,
    `pool idle (total ${d.pool.totalCount}, idle ${d.pool.idleCount})`,
  )
}

/** Resolves when `signal` aborts, at once if it already has (a listener added late never fires). */
export function aborted(signal: AbortSignal): Promise<void> {
  if (signal.aborted) return Promise.resolve()
  return new Promise((resolve) => signal.addEventListener('abort', () => resolve(), { once: true }))
}

export function deferred<T = void>() {
  let resolve!: (v: T) => void
  let reject!: (e: unknown) => void
  const promise = new Promise<T>((res, rej) => {
    resolve = res
    reject = rej
  })
  return { promise, resolve, reject }
}

export interface RawCall {
  req: http.ClientRequest
  /** The response body bytes received so far (as text). */
  received(): string
  /** Status and body, or the socket error when the request was destroyed. */
  done: Promise<{ status: number; body: string } | { error: Error }>
}

/** A request on its own socket (no agent), so destroying it is a real client abort. */
export function rawRequest(
  port: number,
  opts: { method?: string; path: string; headers?: Record<string, string | number>; body?: string },
): RawCall {
  const req = http.request({
    host: '127.0.0.1',
    port,
    method: opts.method ?? 'GET',
    path: opts.path,
    headers: opts.headers,
    agent: false,
  })
  let body = ''
  const done = new Promise<{ status: number; body: string } | { error: Error }>((resolve) => {
    req.on('error', (error) => resolve({ error }))
    req.on('response', (res) => {
      res.setEncoding('utf8')
      res.on('data', (d) => {
        body += d
      })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }))
      res.on('error', (error) => resolve({ error }))
      res.on('aborted', () => resolve({ error: new Error('response aborted') }))
    })
  })
  if (opts.body !== undefined) req.end(opts.body)
  else if (opts.method === undefined || opts.method === 'GET') req.end()
  return { req, done, received: () => body }
}

/** Rows of `table` whose id is in `ids` (from an independent connection). */
export async function rowIds(url: string, sql: string, params: unknown[] = []): Promise<string[]> {
  const rows = await independentQuery<{ id: string }>(url, sql, params)
  return rows.map((r) => r.id)
}
