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
import {
  type ScopedFetch,
  type ScopedFetchOptions,
  scopedFetch,
  scopedSession,
} from '../src/index.ts'

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

export type Tally = ReturnType<typeof tally>

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

/** What a test may set on either entry point (`name` differs between them: see `Entry.mount`). */
export type MountOptions = Omit<ScopedFetchOptions, 'name'> & {
  /**
   * scopedFetch(app) only: leave sessions their default names (`GET /route/:id`) instead of
   * naming them after the `x-test-id` header.
   */
  routeNames?: boolean
}

/**
 * One of the two ways to put an app's requests in a unit of work. The tests of a behaviour
 * both share run once per entry (`describe.each(entries)`), with what differs as data here.
 */
export interface Entry {
  /** The title of the entry's `describe`. */
  readonly title: string
  readonly kind: 'middleware' | 'fetch'
  /** The database (and scope) name of this entry's run of a test file: `hono_<file>`, `hono_fetch_<file>`. */
  db(file: string): string
  /**
   * A tally that follows each request by its `x-test-id`: the middleware's request id (set from
   * the header), or scopedFetch()'s session name (named after it, unless `routeNames`).
   */
  tally(scopeName: string): Tally
  /**
   * Put `app`'s requests in a unit of work of `scope`. The middleware is added where this is
   * called (what the app registered before stays outside), under `options.path` if given; the
   * first mount on an app adds, before it, a middleware that makes `x-test-id` the request id.
   * scopedFetch(app) is made here (so an onError set later must still be followed), and
   * `listen()` hands it the requests under `path` (the rest go to app.fetch, outside any scope).
   */
  mount(app: Hono<any>, scope: Scope<any>, options?: MountOptions & { path?: string }): void
  /** Serve `app` as mounted on a free loopback port. */
  listen(app: Hono<any>, serverOptions?: http.ServerOptions): Promise<Running>
}

/** Sessions named after the `x-test-id` header (else method and path), so a tally can follow each request. */
const byTestId = (req: Request) =>
  req.headers.get('x-test-id') ?? `${req.method} ${new URL(req.url).pathname}`

const withIds = new WeakSet<Hono<any>>()
const fetches = new WeakMap<Hono<any>, { prefix: string; fetch: ScopedFetch }[]>()

export const middleware: Entry = {
  title: 'scopedSession()',
  kind: 'middleware',
  db: (file) => `hono_${file}`,
  tally: (scopeName) => tally(scopeName),
  mount(app, scope, { path, routeNames: _, ...options } = {}) {
    if (!withIds.has(app)) {
      withIds.add(app)
      app.use(async (c, next) => {
        const id = c.req.header('x-test-id')
        if (id) c.set('requestId' as never, id as never)
        await next()
      })
    }
    if (path) app.use(path, scopedSession(scope, options))
    else app.use(scopedSession(scope, options))
  },
  listen: (app, serverOptions) => listen(app, serverOptions),
}

export const fetchEntry: Entry = {
  title: 'scopedFetch(app)',
  kind: 'fetch',
  db: (file) => `hono_fetch_${file}`,
  tally: (scopeName) => tally(scopeName, 'name'),
  mount(app, scope, { path, routeNames, ...options } = {}) {
    const fetch = scopedFetch(app, scope, routeNames ? options : { ...options, name: byTestId })
    const list = fetches.get(app) ?? []
    list.push({ prefix: path?.replace(/\*$/, '') ?? '/', fetch })
    fetches.set(app, list)
  },
  listen(app, serverOptions) {
    const list = fetches.get(app) ?? []
    if (list.length === 1 && list[0]!.prefix === '/')
      return serveFetch(list[0]!.fetch, serverOptions)
    return serveFetch((req, env) => {
      const path = new URL(req.url).pathname
      const fetch = list.find((m) => path.startsWith(m.prefix))?.fetch ?? app.fetch
      return fetch(req, env)
    }, serverOptions)
  },
}

/** Both entry points, for `describe.each(entries)('$title', (m) => …)`. */
export const entries: Entry[] = [middleware, fetchEntry]
