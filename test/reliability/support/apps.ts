/**
 * One application, three adapters: the same routes mounted on Hono, Fastify
 * and Express, so every reliability scenario runs the same units of work
 * through each of them.
 *
 *   POST /unit/:kind/:id?sleep=ms
 *
 * A unit writes `(id, 'begin')`, optionally sleeps in the database, writes
 * `(id, 'end')`, and answers. So a committed unit is always a complete pair
 * and a half-applied one is visible. Kinds:
 *
 *   ok       answers 200
 *   throw    throws after the first row (the adapter answers 500, rolls back)
 *   fail5xx  writes both rows, then returns 503 (rolls back)
 *   abort    as ok; the client goes away at a random moment
 *   timeout  sleeps past the adapter's handler timeout (504 Hono, 503 Fastify/Express)
 *   slow     as ok with a longer sleep (pool exhaustion, shutdown)
 *   hang     writes the first row, then waits for `hang(id)` (a handler that never settles)
 *
 * Failures answer `{ code, message, fatal }`: `fatal` is true when the error
 * (or its cause) is a connection-level error, as `isFatalPgError` judges it.
 */
import type http from 'node:http'
import type { AddressInfo } from 'node:net'
import { serve } from '@hono/node-server'
import type { Scope } from '@scoped/core'
import { scopedSession as expressSession } from '@scoped/express'
import { scopedSession as fastifySession } from '@scoped/fastify'
import { scopedSession as honoSession } from '@scoped/hono'
import { isFatalPgError, type ScopedPool } from '@scoped/pg'
import express from 'express'
import Fastify from 'fastify'
import { Hono } from 'hono'
import { HTTPException } from 'hono/http-exception'
import { timeout } from 'hono/timeout'
import type pg from 'pg'

export const adapters = ['hono', 'fastify', 'express'] as const
export type Adapter = (typeof adapters)[number]

export const kinds = ['ok', 'throw', 'fail5xx', 'abort', 'timeout', 'slow', 'hang'] as const
export type Kind = (typeof kinds)[number]

/** The table every unit writes to. */
export const unitsTable =
  'CREATE TABLE units (id text NOT NULL, part text NOT NULL, PRIMARY KEY (id, part))'

export interface AppOptions {
  scope: Scope<pg.PoolClient>
  db: ScopedPool
  /** The adapter's handler timeout for `timeout` units. Default 50 ms. */
  handlerTimeoutMs?: number
  /** What a `hang` unit waits for after its first row. Default: forever. */
  hang?: (id: string) => Promise<void>
  /**
   * Told what became of the statement a `hang` unit tries after `hang(id)` resolved:
   * its error, or `lateStatementSucceeded` (so a scenario that expects an error fails at once).
   */
  late?: (id: string, outcome: unknown) => void
  /** Told every error that reaches the app's error handler, with the unit's id. */
  onError?: (id: string, error: unknown) => void
  /** Told each unit that really committed (an `afterCommit` hook: it runs after the COMMIT). */
  onCommit?: (id: string) => void
}

export interface RunningApp {
  adapter: Adapter
  port: number
  server: http.Server
  /** Stop listening (and end keep-alive connections): for shutdown, `closeGracefully`. */
  close(): Promise<void>
  /** Stop accepting, let in-flight requests finish, then resolve. */
  closeGracefully(): Promise<void>
}

/** What `late` is told when a `hang` unit's late statement succeeded. */
export const lateStatementSucceeded = Symbol('the late statement succeeded')

/** A planned failure, so a report can tell it from a real one. */
export class PlannedError extends Error {
  readonly code = 'PLANNED'
}

/** The unit of work, framework-free. Returns the status to answer. */
async function unit(opts: AppOptions, kind: string, id: string, sleepMs: number): Promise<number> {
  const { db } = opts
  await db.query("INSERT INTO units (id, part) VALUES ($1, 'begin')", [id])
  const onCommit = opts.onCommit
  if (onCommit) opts.scope.getSession().afterCommit(() => onCommit(id))
  if (kind === 'throw') throw new PlannedError(`planned failure of unit ${id}`)
  if (kind === 'hang') {
    await (opts.hang ? opts.hang(id) : new Promise(() => {}))
    try {
      await db.query('SELECT 1')
    } catch (e) {
      opts.late?.(id, e)
      throw e
    }
    opts.late?.(id, lateStatementSucceeded)
  }
  const ms = kind === 'timeout' ? 1_000 : sleepMs
  if (ms > 0) await db.query('SELECT pg_sleep($1)', [ms / 1000])
  await db.query("INSERT INTO units (id, part) VALUES ($1, 'end')", [id])
  return kind === 'fail5xx' ? 503 : 200
}

/** What a unit answers: its id, or (for a returned 5xx) why. */
function bodyOf(status: number, id: string): object {
  return status >= 500
    ? { code: 'RETURNED_5XX', message: `the handler returned ${status}`, fatal: false }
    : { id }
}

function isFatal(e: unknown): boolean {
  for (let c = e, depth = 0; c !== undefined && c !== null && depth < 5; depth++) {
    if (isFatalPgError(c)) return true
    c = (c as { cause?: unknown }).cause
  }
  return false
}

/** The body of a failure: what the client records as the reason. */
export function failureBody(e: unknown): { code: string; message: string; fatal: boolean } {
  const err = e as { code?: unknown; message?: unknown }
  return {
    code: typeof err?.code === 'string' ? err.code : 'ERROR',
    message: typeof err?.message === 'string' ? err.message : String(e),
    fatal: isFatal(e),
  }
}

function sleepOf(query: unknown): number {
  const n = Number(query ?? 0)
  return Number.isFinite(n) && n > 0 ? n : 0
}

export async function startApp(adapter: Adapter, opts: AppOptions): Promise<RunningApp> {
  const timeoutMs = opts.handlerTimeoutMs ?? 50
  if (adapter === 'hono') {
    const app = new Hono()
    app.onError((err, c) => {
      opts.onError?.(c.req.param('id') ?? '', err)
      return err instanceof HTTPException ? err.getResponse() : c.json(failureBody(err), 500)
    })
    app.use(honoSession(opts.scope, { cancelOnAbort: true }))
    app.use('/unit/timeout/*', timeout(timeoutMs))
    app.post('/unit/:kind/:id', async (c) => {
      const status = await unit(
        opts,
        c.req.param('kind'),
        c.req.param('id'),
        sleepOf(c.req.query('sleep')),
      )
      return c.json(bodyOf(status, c.req.param('id')), status as 200)
    })
    // As packages/hono/test/support.ts listens; not imported, since this file also runs in a
    // child process without vitest (the graceful shutdown scenario).
    const server = await new Promise<http.Server>((resolve) => {
      const s = serve({ fetch: app.fetch, port: 0, hostname: '127.0.0.1' }, () =>
        resolve(s as http.Server),
      )
    })
    return wrap(adapter, server, (server.address() as AddressInfo).port)
  }
  if (adapter === 'fastify') {
    const app = Fastify()
    await app.register(fastifySession, { scope: opts.scope, cancelOnAbort: true })
    app.setErrorHandler((err, req, reply) => {
      opts.onError?.((req.params as { id?: string }).id ?? '', err)
      // Fastify's own errors carry their status (handlerTimeout: 503).
      const code = (err as { statusCode?: unknown }).statusCode
      const status = typeof code === 'number' && code >= 400 ? code : 500
      void reply.code(status).send(failureBody(err))
    })
    const handler = async (
      req: { params: unknown; query: unknown },
      reply: { code(n: number): unknown },
    ) => {
      const { kind, id } = req.params as { kind?: string; id: string }
      const status = await unit(
        opts,
        kind ?? 'timeout',
        id,
        sleepOf((req.query as { sleep?: string }).sleep),
      )
      reply.code(status)
      return bodyOf(status, id)
    }
    app.post('/unit/timeout/:id', { handlerTimeout: timeoutMs }, handler)
    app.post('/unit/:kind/:id', handler)
    await app.listen({ port: 0, host: '127.0.0.1' })
    return wrap(adapter, app.server, (app.server.address() as AddressInfo).port, () => app.close())
  }
  const app = express()
  app.use(expressSession(opts.scope, { cancelOnAbort: true }))
  app.post('/unit/:kind/:id', async (req, res) => {
    const { kind, id } = req.params as { kind: string; id: string }
    if (kind === 'timeout') {
      res.setTimeout(timeoutMs, () => {
        if (!res.headersSent)
          res.status(503).json({ code: 'TIMEOUT', message: 'handler timeout', fatal: false })
      })
    }
    const status = await unit(opts, kind, id, sleepOf(req.query.sleep))
    if (!res.headersSent) res.status(status).json(bodyOf(status, id))
  })
  app.use(
    (err: unknown, req: express.Request, res: express.Response, _next: express.NextFunction) => {
      opts.onError?.(String(req.params?.id ?? /[^/]+$/.exec(req.path)?.[0] ?? ''), err)
      if (!res.headersSent) res.status(500).json(failureBody(err))
    },
  )
  const server = await new Promise<http.Server>((resolve) => {
    const s = app.listen(0, '127.0.0.1', () => resolve(s))
  })
  return wrap(adapter, server, (server.address() as AddressInfo).port)
}

function wrap(
  adapter: Adapter,
  server: http.Server,
  port: number,
  closeApp?: () => Promise<void>,
): RunningApp {
  const stopListening = () =>
    new Promise<void>((resolve) => {
      server.close(() => resolve())
      server.closeIdleConnections()
    })
  return {
    adapter,
    port,
    server,
    async close() {
      server.closeAllConnections()
      if (closeApp) await closeApp()
      else await stopListening()
    },
    async closeGracefully() {
      if (closeApp) await closeApp()
      else await stopListening()
    },
  }
}
