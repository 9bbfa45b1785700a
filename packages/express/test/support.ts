/**
 * Shared by the Express tests: a real server on 127.0.0.1, a real pool on the
 * test database, release counting through `node:diagnostics_channel`, and
 * "wait until the server settled" (every scope ended, every connection idle).
 */
import dc from 'node:diagnostics_channel'
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import { createScope, type Scope } from '@scoped/core'
import { pgDriver, type ScopedPool, scopedPool } from '@scoped/pg'
import type { Express } from 'express'
import pg from 'pg'
import { expect, vi } from 'vitest'
import { backends } from '../../../test/support/db.ts'

export interface Server {
  url: string
  port: number
  server: http.Server
  close(): Promise<void>
}

/** `app.listen(0, '127.0.0.1')`, or listen with a server made by the caller (for its options). */
export async function listen(app: Express, server?: http.Server): Promise<Server> {
  const srv = await new Promise<http.Server>((resolve, reject) => {
    if (server) {
      server.once('error', reject)
      server.listen(0, '127.0.0.1', () => resolve(server))
    } else {
      const s = app.listen(0, '127.0.0.1', (err?: Error) => (err ? reject(err) : resolve(s)))
    }
  })
  const { port } = srv.address() as AddressInfo
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    server: srv,
    close: () =>
      new Promise<void>((resolve) => {
        srv.closeAllConnections()
        srv.close(() => resolve())
      }),
  }
}

export interface Db {
  scope: Scope<pg.PoolClient>
  pool: pg.Pool
  db: ScopedPool
  appName: string
  close(): Promise<void>
}

/** A pool and a (non-default) scope over it; `application_name` lets tests find its backends. */
export function makeDb(
  url: string,
  name: string,
  opts: { poolMax?: number; onError?: (error: unknown, context: { during: string }) => void } = {},
): Db {
  const appName = `scoped_express_${name}`
  const pool = new pg.Pool({
    connectionString: url,
    max: opts.poolMax ?? 10,
    application_name: appName,
  })
  const scope = createScope({
    driver: pgDriver(pool),
    name,
    default: false,
    leakDetectionMs: 0,
    ...(opts.onError && { onError: opts.onError }),
  })
  return { scope, pool, db: scopedPool(scope), appName, close: () => scope.close() }
}

/** Count `scoped:release` events of one scope. */
export function releases(scopeName: string): { readonly count: number; stop(): void } {
  let count = 0
  const listener = (m: unknown) => {
    if ((m as { scope: string }).scope === scopeName) count++
  }
  dc.subscribe('scoped:release', listener)
  return {
    get count() {
      return count
    },
    stop: () => dc.unsubscribe('scoped:release', listener),
  }
}

/** Wait until no request of `db` is open and the pool is idle; then assert the database agrees. */
export async function settled(d: Db): Promise<void> {
  await vi.waitFor(
    () => {
      expect(d.scope.stats().open).toBe(0)
      expect(d.pool.totalCount).toBe(d.pool.idleCount)
    },
    { timeout: 10_000, interval: 10 },
  )
  expect(d.scope.stats().holding).toBe(0)
  expect(d.pool.waitingCount).toBe(0)
}

/** Backends of the pool that sit inside a transaction (the leak to look for). */
export async function openTransactions(url: string, d: Db): Promise<string[]> {
  const rows = await backends(url, d.appName)
  return rows.map((r) => r.state).filter((s) => s.startsWith('idle in transaction'))
}

/** A promise and its resolver: the server tells the test where the handler is. */
export function latch<T = void>(): { promise: Promise<T>; resolve: (v: T) => void } {
  let resolve!: (v: T) => void
  const promise = new Promise<T>((r) => {
    resolve = r
  })
  return { promise, resolve }
}

export interface RawResult {
  status: number | undefined
  body: string
  /** How the exchange ended: a complete response, or an error (and which). */
  ended: 'complete' | 'error'
  error?: string
}

/**
 * One request over a fresh socket with node:http, reporting whether the body
 * ended cleanly: a response cut off mid-body is `ended: 'error'`.
 */
export function rawRequest(
  base: string,
  path: string,
  opts: { method?: string; body?: string | Buffer; headers?: Record<string, string> } = {},
): Promise<RawResult> {
  return new Promise((resolve) => {
    let status: number | undefined
    let body = ''
    let done = false
    const finish = (r: RawResult) => {
      if (done) return
      done = true
      resolve(r)
    }
    const req = http.request(`${base}${path}`, {
      method: opts.method ?? 'GET',
      agent: false,
      headers: opts.headers,
    })
    req.on('response', (res) => {
      status = res.statusCode
      res.setEncoding('utf8')
      res.on('data', (c: string) => {
        body += c
      })
      res.on('end', () => {
        // 'end' after 'aborted' is not a clean end; node:http reports it through res.complete.
        if (res.complete) finish({ status, body, ended: 'complete' })
        else finish({ status, body, ended: 'error', error: 'incomplete' })
      })
      res.on('error', (e) => finish({ status, body, ended: 'error', error: e.message }))
      res.on('aborted', () => finish({ status, body, ended: 'error', error: 'aborted' }))
    })
    req.on('error', (e) => finish({ status, body, ended: 'error', error: e.message }))
    req.end(opts.body)
  })
}
