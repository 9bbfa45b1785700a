/**
 * One HTTP server of the benchmarks, in a process of its own (so the load
 * generator does not share its thread), bundled by bench/lib/bundle.ts and run
 * with plain `node` — the code users run, not a TypeScript loader's output.
 *
 * Configured by the BENCH_APP environment variable (JSON: framework, variant,
 * url, poolMax). Listens on 127.0.0.1, port 0, and tells its parent the port
 * over IPC; answers the parent's questions (CPU time, connection hold times,
 * heap after gc) over the same channel.
 *
 * Routes: `GET /hello` (no database), `GET /orders/:id` (one read by primary
 * key), `POST /orders` (an order and its three items in one transaction).
 */
import { AsyncLocalStorage } from 'node:async_hooks'
import dc from 'node:diagnostics_channel'
import type { AddressInfo } from 'node:net'
import { createScope, type ReleaseMessage, type Scope } from '@scoped/core'
import { pgDriver, scopedPool } from '@scoped/pg'
import { Kysely, PostgresDialect } from 'kysely'
import pg from 'pg'
import type { EntityManager } from './mikro.ts'
import {
  type DB,
  INSERT_ORDER,
  insertItems,
  type NewOrder,
  SELECT_ORDER,
  totalOf,
} from './schema.ts'

export type Framework = 'hono' | 'fastify' | 'express'

export interface AppConfig {
  framework: Framework
  variant: string
  url: string
  poolMax: number
}

type Handler = (req: { id?: string; body?: unknown }) => Promise<unknown>

type Middleware =
  | { kind: 'none' }
  | { kind: 'als' }
  /**
   * A bare `als.run()` middleware plus what the framework charges for the hooks any design
   * needs that commits before the response is written and hears a client leave: Fastify,
   * a no-op `onSend` hook and a `'close'` listener; Express, no-op subscribers on the
   * router's tracing channel (its only report of errors passed to `next(err)` and of when
   * an async handler settled). Nothing of ours runs in it.
   */
  | { kind: 'als-hooks' }
  | { kind: 'scoped'; scope: Scope<any> }
  /** Hono only: `scopedFetch(app, scope)` around the fetch handler instead of a middleware. */
  | { kind: 'scoped-fetch'; scope: Scope<any> }
  /** Hono only: a bare `als.run()` around the fetch handler, the floor of any fetch wrapper. */
  | { kind: 'als-fetch' }
  | { kind: 'mikro'; create: (next: () => any) => any }

interface App {
  middleware: Middleware
  read?: Handler
  write?: Handler
  /** What the parent may ask about the scope after a run (a request that never queries holds nothing). */
  check?: () => Record<string, unknown>
}

const config = JSON.parse(process.env.BENCH_APP ?? '{}') as AppConfig
const als = new AsyncLocalStorage<object>()

// ── connection hold times ────────────────────────────────────────────────
/** Checkout → release of every connection in the measured window, in ms, as seen by the pool. */
let held: number[] = []
/** The same from `scoped:release` (heldMs), for the scoped variants. */
let scopedHeld: number[] = []
let out = 0
let peak = 0

function checkedOut(): void {
  out++
  if (out > peak) peak = out
}

/** pg-pool: 'acquire' when a client is handed out, 'release' when it comes back. */
function watchPgPool(pool: pg.Pool): pg.Pool {
  const since = new WeakMap<object, number>()
  pool.on('acquire', (client) => {
    since.set(client, performance.now())
    checkedOut()
  })
  pool.on('release', (_err, client) => {
    const t = since.get(client)
    if (t !== undefined) held.push(performance.now() - t)
    out--
  })
  return pool
}

/** knex's tarn pool (MikroORM): 'acquireSuccess' and 'release' carry the resource. */
function watchTarn(pool: { on(e: string, f: (...a: any[]) => void): void }): void {
  const since = new WeakMap<object, number>()
  pool.on('acquireSuccess', (_id: number, resource: object) => {
    since.set(resource, performance.now())
    checkedOut()
  })
  pool.on('release', (resource: object) => {
    const t = since.get(resource)
    if (t !== undefined) held.push(performance.now() - t)
    out--
  })
}

function watchScoped(): void {
  dc.subscribe('scoped:release', (m) => {
    scopedHeld.push((m as ReleaseMessage).heldMs)
  })
}

// ── variants ─────────────────────────────────────────────────────────────

const newPool = (extra: Record<string, unknown> = {}) =>
  watchPgPool(new pg.Pool({ connectionString: config.url, max: config.poolMax, ...extra }))

/** At most `max` calls of `hold(fn)` run at once; the others wait in FIFO order. */
function semaphore(max: number) {
  let free = max
  const waiting: (() => void)[] = []
  const done = () => {
    const next = waiting.shift()
    if (next) next()
    else free++
  }
  return {
    async hold<T>(fn: () => T): Promise<Awaited<T>> {
      if (free > 0) free--
      else await new Promise<void>((resolve) => waiting.push(resolve))
      try {
        return await fn()
      } finally {
        done()
      }
    },
  }
}

const idOf = (req: { id?: string }) => Number(req.id)
const orderOf = (req: { body?: unknown }) => req.body as NewOrder

async function makeApp(variant: string): Promise<App> {
  // `<variant>+als`: the same hand-written code under a bare AsyncLocalStorage.run middleware,
  // the floor of any design built on AsyncLocalStorage.
  if (variant.endsWith('+als')) {
    const app = await makeApp(variant.slice(0, -'+als'.length))
    return { ...app, middleware: { kind: 'als' } }
  }
  // `<variant>+scoped`: the same hand-written code under scopedSession (its scope unused):
  // what the middleware and an untouched scope cost, apart from the session's work.
  if (variant.endsWith('+scoped')) {
    const app = await makeApp(variant.slice(0, -'+scoped'.length))
    const unused = await makeApp('scoped')
    return { ...app, middleware: unused.middleware }
  }
  switch (variant) {
    case 'none':
      return { middleware: { kind: 'none' } }
    case 'als':
      return { middleware: { kind: 'als' } }
    case 'als-hooks':
      if (config.framework === 'hono')
        throw new Error("variant 'als-hooks' is Fastify's and Express's")
      return { middleware: { kind: 'als-hooks' } }
    case 'scoped': {
      // A real scope over a real pool that no route uses: it must never check a connection out.
      const pool = new pg.Pool({ connectionString: config.url, max: config.poolMax })
      const scope = createScope({ driver: pgDriver(pool), name: 'bench' })
      return {
        middleware: { kind: 'scoped', scope },
        check: () => ({
          acquired: scope.stats().totals.acquired,
          poolTotal: pool.totalCount,
          open: scope.stats().open,
        }),
      }
    }
    case 'als-fetch':
      if (config.framework !== 'hono') throw new Error("variant 'als-fetch' is Hono's only")
      return { middleware: { kind: 'als-fetch' } }
    case 'scoped-fetch': {
      if (config.framework !== 'hono') throw new Error("variant 'scoped-fetch' is Hono's only")
      const app = await makeApp('scoped')
      const mw = app.middleware as { kind: 'scoped'; scope: Scope<any> }
      return { ...app, middleware: { kind: 'scoped-fetch', scope: mw.scope } }
    }
    case 'pool-query': {
      const pool = newPool()
      return {
        middleware: { kind: 'none' },
        read: async (req) => (await pool.query(SELECT_ORDER, [idOf(req)])).rows[0],
      }
    }
    case 'connect': {
      const pool = newPool()
      return {
        middleware: { kind: 'none' },
        read: async (req) => {
          const client = await pool.connect()
          try {
            return (await client.query(SELECT_ORDER, [idOf(req)])).rows[0]
          } finally {
            client.release()
          }
        },
      }
    }
    case 'hand-tx': {
      const pool = newPool()
      const unit = async <T>(fn: (c: pg.PoolClient) => Promise<T>): Promise<T> => {
        const client = await pool.connect()
        try {
          await client.query('BEGIN')
          const result = await fn(client)
          await client.query('COMMIT')
          client.release()
          return result
        } catch (e) {
          await client.query('ROLLBACK').catch(() => {})
          client.release(e as Error)
          throw e
        }
      }
      return {
        middleware: { kind: 'none' },
        read: (req) => unit(async (c) => (await c.query(SELECT_ORDER, [idOf(req)])).rows[0]),
        write: (req) =>
          unit(async (c) => {
            const order = orderOf(req)
            const { rows } = await c.query(INSERT_ORDER, [order.customer, totalOf(order)])
            const id = rows[0].id as number
            const items = insertItems(id, order)
            await c.query(items.text, items.values)
            return { id }
          }),
      }
    }
    case 'scoped-none':
    case 'scoped-none-idle':
    case 'scoped-auto':
    case 'scoped-auto-pipelined': {
      const pool = newPool(variant === 'scoped-auto-pipelined' ? { pipeline: true } : {})
      const scope = createScope({
        driver: pgDriver(pool),
        name: 'bench',
        transaction: variant.startsWith('scoped-none') ? 'none' : 'auto',
        release: variant === 'scoped-none-idle' ? 'idle' : 'end',
      })
      watchScoped()
      const db = scopedPool(scope)
      return {
        middleware: { kind: 'scoped', scope },
        read: async (req) => (await db.query(SELECT_ORDER, [idOf(req)])).rows[0],
        write: async (req) => {
          const order = orderOf(req)
          const { rows } = await db.query(INSERT_ORDER, [order.customer, totalOf(order)])
          const id = rows[0].id as number
          const items = insertItems(id, order)
          await db.query(items.text, items.values)
          return { id }
        },
      }
    }
    case 'kysely-tx': {
      const db = new Kysely<DB>({ dialect: new PostgresDialect({ pool: newPool() }) })
      return {
        middleware: { kind: 'none' },
        read: (req) =>
          db
            .transaction()
            .execute((trx) =>
              trx
                .selectFrom('orders')
                .select(['id', 'customer', 'total', 'created_at'])
                .where('id', '=', idOf(req))
                .executeTakeFirst(),
            ),
        write: (req) =>
          db.transaction().execute(async (trx) => {
            const order = orderOf(req)
            const { id } = await trx
              .insertInto('orders')
              .values({ customer: order.customer, total: String(totalOf(order)) })
              .returning('id')
              .executeTakeFirstOrThrow()
            await trx
              .insertInto('order_items')
              .values(order.items.map((i) => ({ order_id: id, ...i })))
              .execute()
            return { id }
          }),
      }
    }
    case 'scoped-kysely':
    case 'scoped-kysely-pipelined': {
      const { kyselyDriver, scopedKysely } = await import('@scoped/kysely')
      const pool = newPool(variant === 'scoped-kysely-pipelined' ? { pipeline: true } : {})
      const dialect = new PostgresDialect({ pool })
      const scope = createScope({ driver: kyselyDriver(dialect, { pool }), name: 'bench' })
      watchScoped()
      const db = scopedKysely<DB>(scope, { dialect })
      return {
        middleware: { kind: 'scoped', scope },
        read: (req) =>
          db
            .selectFrom('orders')
            .select(['id', 'customer', 'total', 'created_at'])
            .where('id', '=', idOf(req))
            .executeTakeFirst(),
        write: async (req) => {
          const order = orderOf(req)
          const { id } = await db
            .insertInto('orders')
            .values({ customer: order.customer, total: String(totalOf(order)) })
            .returning('id')
            .executeTakeFirstOrThrow()
          await db
            .insertInto('order_items')
            .values(order.items.map((i) => ({ order_id: id, ...i })))
            .execute()
          return { id }
        },
      }
    }
    case 'mikro-rc':
    case 'mikro-rc-held':
    case 'mikro-rc-tx':
    case 'scoped-mikro':
    case 'scoped-mikro-none': {
      const { initMikro } = await import('./mikro.ts')
      const { orm, Order, requestContext } = await initMikro(config.url, config.poolMax)
      watchTarn(orm.em.getConnection('write').getKnex().client.pool)
      const plain = (o: any) =>
        o && { id: o.id, customer: o.customer, total: o.total, created_at: o.createdAt }
      const create = (em: EntityManager, order: NewOrder) =>
        em.create(Order, {
          customer: order.customer,
          total: String(totalOf(order)),
          items: order.items.map((i) => ({ sku: i.sku, qty: i.qty, price: String(i.price) })),
        })
      if (variant === 'mikro-rc') {
        // MikroORM's own request scoping: a fork of the global EntityManager per request.
        return {
          middleware: { kind: 'mikro', create: requestContext },
          read: async (req) => plain(await orm.em.findOne(Order, idOf(req))),
          write: async (req) => {
            const order = create(orm.em, orderOf(req))
            await orm.em.flush()
            return { id: order.id }
          },
        }
      }
      if (variant === 'mikro-rc-held') {
        // Diagnostic, in no suite: RequestContext with each request holding one of `poolMax`
        // slots from its start until its chain settles, as a session (release: 'end') holds its
        // connection; RequestContext's own checkouts then never wait. Tells how much of a
        // session's gap is that hold rather than its code.
        const slots = semaphore(config.poolMax)
        return {
          middleware: {
            kind: 'mikro',
            create: (next) => slots.hold(() => requestContext(next)),
          },
          read: async (req) => plain(await orm.em.findOne(Order, idOf(req))),
        }
      }
      if (variant === 'mikro-rc-tx') {
        // The same, with the read in a transaction (BEGIN/COMMIT, like 'auto'): what the
        // two extra round trips and MikroORM's own transaction handling cost.
        return {
          middleware: { kind: 'mikro', create: requestContext },
          read: async (req) =>
            plain(await orm.em.transactional((em) => em.findOne(Order, idOf(req)))),
          write: async (req) =>
            orm.em.transactional(async (em) => {
              const order = create(em, orderOf(req))
              await em.flush()
              return { id: order.id }
            }),
        }
      }
      const { mikroOrmDriver, currentEntityManager } = await import('@scoped/mikro-orm')
      const scope = createScope({
        driver: mikroOrmDriver(orm as any),
        name: 'bench',
        // 'none': autocommit on the session's connection, as RequestContext's read is (on a pool
        // connection); em.flush() then sends its own BEGIN/COMMIT, as RequestContext's does.
        transaction: variant === 'scoped-mikro-none' ? 'none' : 'auto',
      })
      watchScoped()
      const em = async () => (await currentEntityManager(scope)) as unknown as EntityManager
      return {
        middleware: { kind: 'scoped', scope },
        read: async (req) => plain(await (await em()).findOne(Order, idOf(req))),
        write: async (req) => {
          const manager = await em()
          const order = create(manager, orderOf(req))
          await manager.flush()
          return { id: order.id }
        },
      }
    }
    default:
      throw new Error(`bench/apps/http.ts: unknown variant '${variant}'`)
  }
}

// ── frameworks ───────────────────────────────────────────────────────────

function noop(): void {}

const missing: Handler = async () => {
  throw new Error(`variant '${config.variant}' has no such route`)
}

async function listenHono(app: App): Promise<number> {
  const { Hono } = await import('hono')
  const { serve } = await import('@hono/node-server')
  const hono = new Hono()
  const mw = app.middleware
  if (mw.kind === 'als') hono.use((c, next) => als.run({ c }, next))
  if (mw.kind === 'scoped') {
    const { scopedSession } = await import('@scoped/hono')
    hono.use(scopedSession(mw.scope))
  }
  if (mw.kind === 'mikro') hono.use((_c, next) => mw.create(next))
  // Requests cut off when autocannon stops a run are aborted scopes: not worth a stack trace.
  hono.onError((err, c) => {
    if ((err as { code?: unknown }).code !== 'SCOPE_ABORTED') console.error(err)
    return c.text('error', 500)
  })
  const read = app.read ?? missing
  const write = app.write ?? missing
  hono.get('/hello', (c) => c.json({ hello: 'world' }))
  hono.get('/orders/:id', async (c) => c.json((await read({ id: c.req.param('id') })) as object))
  hono.post('/orders', async (c) =>
    c.json((await write({ body: await c.req.json() })) as object, 201),
  )
  let fetch = hono.fetch
  if (mw.kind === 'scoped-fetch') {
    const { scopedFetch } = await import('@scoped/hono')
    fetch = scopedFetch(hono, mw.scope)
  }
  if (mw.kind === 'als-fetch') {
    const inner = hono.fetch
    fetch = (request, env) => als.run({ request }, inner, request, env)
  }
  return new Promise((resolve) => {
    serve({ fetch, port: 0, hostname: '127.0.0.1' }, (info) => resolve(info.port))
  })
}

async function listenFastify(app: App): Promise<number> {
  const { default: Fastify } = await import('fastify')
  const fastify = Fastify({ logger: false })
  const mw = app.middleware
  if (mw.kind === 'als') fastify.addHook('onRequest', (req, _reply, done) => als.run({ req }, done))
  if (mw.kind === 'als-hooks') {
    fastify.addHook('onRequest', (req, reply, done) => {
      reply.raw.on('close', noop)
      als.run({ req }, done)
    })
    fastify.addHook('onSend', (_req, _reply, payload, done) => done(null, payload))
  }
  if (mw.kind === 'scoped') {
    const { scopedSession } = await import('@scoped/fastify')
    await fastify.register(scopedSession, { scope: mw.scope })
  }
  if (mw.kind === 'mikro') {
    fastify.addHook('onRequest', (_req, _reply, done) => {
      mw.create(done)
    })
  }
  const read = app.read ?? missing
  const write = app.write ?? missing
  fastify.get('/hello', async () => ({ hello: 'world' }))
  fastify.get('/orders/:id', async (req) => read({ id: (req.params as { id: string }).id }))
  fastify.post('/orders', async (req, reply) => {
    reply.code(201)
    return write({ body: req.body })
  })
  await fastify.listen({ port: 0, host: '127.0.0.1' })
  return (fastify.server.address() as AddressInfo).port
}

async function listenExpress(app: App): Promise<number> {
  const { default: express } = await import('express')
  const server = express()
  const mw = app.middleware
  if (mw.kind === 'als') server.use((req, _res, next) => als.run({ req }, next))
  if (mw.kind === 'als-hooks') {
    // The events @scoped/express listens to (not asyncStart: see its router-tracing.ts).
    dc.tracingChannel('express.router.request').subscribe({
      start: noop,
      end: noop,
      asyncEnd: noop,
      error: noop,
    } as unknown as dc.TracingChannelSubscribers<object>)
    server.use((req, _res, next) => als.run({ req }, next))
  }
  if (mw.kind === 'scoped') {
    const { scopedSession } = await import('@scoped/express')
    server.use(scopedSession(mw.scope))
  }
  if (mw.kind === 'mikro') server.use((_req, _res, next) => mw.create(next))
  const read = app.read ?? missing
  const write = app.write ?? missing
  server.get('/hello', (_req, res) => {
    res.json({ hello: 'world' })
  })
  server.get('/orders/:id', async (req, res) => {
    res.json(await read({ id: req.params.id }))
  })
  server.post('/orders', express.json(), async (req, res) => {
    res.status(201).json(await write({ body: req.body }))
  })
  return new Promise((resolve) => {
    const http = server.listen(0, '127.0.0.1', () => resolve((http.address() as AddressInfo).port))
  })
}

// ── the parent's questions ───────────────────────────────────────────────

interface Question {
  id: number
  cmd: 'cpu' | 'hold-start' | 'hold' | 'heap' | 'check'
}

function answer(app: App, q: Question): Record<string, unknown> {
  switch (q.cmd) {
    case 'cpu': {
      const { user, system } = process.cpuUsage()
      return { cpuUs: user + system, userUs: user, systemUs: system }
    }
    case 'hold-start':
      held = []
      scopedHeld = []
      peak = out
      return {}
    case 'hold':
      return { held, scopedHeld, peak }
    case 'heap': {
      const gc = (globalThis as { gc?: () => void }).gc
      if (!gc) return { heapUsed: Number.NaN }
      for (let i = 0; i < 3; i++) gc()
      return { heapUsed: process.memoryUsage().heapUsed }
    }
    case 'check':
      return app.check?.() ?? {}
  }
}

async function main(): Promise<void> {
  const app = await makeApp(config.variant)
  const listen = { hono: listenHono, fastify: listenFastify, express: listenExpress }[
    config.framework
  ]
  const port = await listen(app)
  process.on('message', (q: Question) => {
    process.send?.({ id: q.id, ...answer(app, q) })
  })
  // The runner went away, or stops us: exit normally (so --cpu-prof writes its profile).
  process.on('disconnect', () => process.exit(0))
  process.on('SIGTERM', () => process.exit(0))
  process.send?.({ ready: true, port })
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
