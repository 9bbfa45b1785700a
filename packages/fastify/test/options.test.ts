/**
 * Registration and options: the default scope is used when none is passed
 * (a clear error when there is none), every wrong option is a TypeError that
 * names it, `name` and `commitOn` change what users see and what commits,
 * a closing scope answers 503, and routes declared before the plugin loaded
 * are reported.
 */
import { Writable } from 'node:stream'
import { createScope, getSession, type Scope } from '@scoped/core'
import { pgDriver, scopedPool } from '@scoped/pg'
import Fastify, { type FastifyInstance } from 'fastify'
import pg from 'pg'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { scopedSession } from '../src/index.ts'
import { committed, expectSettled, type Harness, harness, listen } from './support.ts'

let h: Harness
const apps: FastifyInstance[] = []

/** What @fastify/session does: its own request.session (typed differently, hence the cast). */
function decorateSessionElsewhere(app: FastifyInstance): void {
  ;(app.decorateRequest as (name: string, value: null) => FastifyInstance)('session', null)
}

function track(app: FastifyInstance): FastifyInstance {
  apps.push(app)
  return app
}

async function insert(tag: string): Promise<void> {
  await h.db.query('INSERT INTO events (tag) VALUES ($1)', [tag])
}

async function rowsOf(tag: string): Promise<number> {
  const rows = await committed(h, 'SELECT count(*)::int AS n FROM events WHERE tag = $1', [tag])
  return rows[0].n
}

beforeAll(async () => {
  h = await harness('fastify_options')
  await h.independent.query('CREATE TABLE events (id serial PRIMARY KEY, tag text NOT NULL)')
})

afterEach(async () => {
  await Promise.all(apps.splice(0).map((a) => a.close()))
})

afterAll(async () => {
  await h.close()
})

describe('which scope', () => {
  it('without a scope and without a default scope, registration fails with the fix', async () => {
    const app = track(Fastify())
    await expect(app.register(scopedSession)).rejects.toThrow(
      /there is no scope to open sessions in\. Pass one: app\.register\(scopedSession, \{ scope \}\), or create the default scope/,
    )
  })

  it('without a scope option, the default scope is used (and getSession() works in handlers)', async () => {
    const pool = new pg.Pool({ connectionString: h.url, max: 2 })
    const scope: Scope<pg.PoolClient> = createScope({ driver: pgDriver(pool), name: 'default-one' })
    try {
      const app = track(Fastify())
      await app.register(scopedSession)
      app.post('/default', async (request) => {
        const session = getSession()
        await scopedPool(scope).query("INSERT INTO events (tag) VALUES ('default')")
        return { same: request.session === session, name: session.name }
      })
      const { base } = await listen(app)
      const res = await fetch(`${base}/default`, { method: 'POST' })
      expect(await res.json()).toEqual({ same: true, name: 'POST /default' })
      expect(await rowsOf('default')).toBe(1)
      expect(scope.stats().holding).toBe(0)
      expect(pool.totalCount).toBe(pool.idleCount)
    } finally {
      await scope.close()
    }
  })
})

describe('option validation', () => {
  const wrong: [Record<string, unknown>, RegExp][] = [
    [{ cancelOnAbort: 'yes' }, /\{ cancelOnAbort \}\): expected a boolean, got "yes"/],
    [
      { commitOn: true },
      /\{ commitOn \}\): expected a function \(\{ status, error \}\) => boolean, got boolean/,
    ],
    [{ name: 'orders' }, /\{ name \}\): expected a function \(request\) => string, got "orders"/],
    [{ scope: {} }, /\{ scope \}\): expected a Scope from createScope\(\), got object/],
    [{ decorate: 1 }, /\{ decorate \}\): expected a boolean, got 1/],
    [
      { cancelOnAbrot: true },
      /\{ cancelOnAbrot \}\): unknown option\. Known options: scope, name, commitOn, cancelOnAbort, decorate/,
    ],
  ]
  for (const [options, message] of wrong) {
    it(`${JSON.stringify(options)} is a TypeError naming the option`, async () => {
      const app = track(Fastify())
      const error = await app.register(scopedSession, { scope: h.scope, ...options } as never).then(
        () => undefined,
        (e: unknown) => e,
      )
      expect(error).toBeInstanceOf(TypeError)
      expect((error as Error).message).toMatch(message)
    })
  }

  it('request.session already decorated by another plugin: a clear error pointing at decorate: false', async () => {
    const app = track(Fastify())
    decorateSessionElsewhere(app)
    await expect(app.register(scopedSession, { scope: h.scope })).rejects.toThrow(
      /request\.session is already decorated by another plugin .* Pass \{ decorate: false \}/,
    )
    const ok = track(Fastify())
    decorateSessionElsewhere(ok)
    await ok.register(scopedSession, { scope: h.scope, decorate: false })
    ok.get('/', async (request) => ({
      theirs: request.session === null,
      ours: h.scope.getSession().name,
    }))
    const { base } = await listen(ok)
    expect(await (await fetch(base)).json()).toEqual({ theirs: true, ours: 'GET /' })
  })

  it('registered twice for one scope (here: again in a child context): refused at once, saying why', async () => {
    const app = track(Fastify({ pluginTimeout: 2_000 }))
    await app.register(scopedSession, { scope: h.scope })
    app.register(async (child) => {
      await child.register(scopedSession, { scope: h.scope, decorate: false })
    })
    let error: unknown
    try {
      await app.ready()
    } catch (e) {
      error = e
    }
    expect(String(error)).toMatch(
      /already registered for scope '.+'.*Register it once, at the root/,
    )
  })
})

describe('name', () => {
  it('defaults to METHOD route-pattern, and (no route) for a 404; a custom name is used as given', async () => {
    const app = track(Fastify())
    await app.register(scopedSession, { scope: h.scope })
    app.get('/orders/:id', async () => ({ name: h.scope.getSession().name }))
    app.setNotFoundHandler(async (_request, reply) => {
      await insert('not-found')
      return reply.code(404).send({ name: h.scope.getSession().name })
    })
    const { base } = await listen(app)
    expect(await (await fetch(`${base}/orders/7`)).json()).toEqual({ name: 'GET /orders/:id' })
    const missing = await fetch(`${base}/nowhere`)
    expect(missing.status).toBe(404)
    expect(await missing.json()).toEqual({ name: 'GET (no route)' })
    // A returned 404 commits by default, in the not-found handler too.
    expect(await rowsOf('not-found')).toBe(1)

    const custom = track(Fastify())
    await custom.register(scopedSession, {
      scope: h.scope,
      name: (request) => `api:${request.routeOptions.url}`,
    })
    custom.get('/orders/:id', async () => ({ name: h.scope.getSession().name }))
    const c = await listen(custom)
    expect(await (await fetch(`${c.base}/orders/7`)).json()).toEqual({ name: 'api:/orders/:id' })
    await expectSettled(h)
  })

  it('a name() that returns no string fails the request with a 500 naming the option; nothing leaks', async () => {
    const app = track(Fastify())
    await app.register(scopedSession, {
      scope: h.scope,
      name: () => undefined as unknown as string,
    })
    app.get('/', async () => ({ unreachable: true }))
    const { base } = await listen(app)
    const res = await fetch(base)
    expect(res.status).toBe(500)
    expect(((await res.json()) as { message: string }).message).toMatch(
      /scopedSession\(\{ name \}\): expected name\(request\) to return a non-empty string, got undefined/,
    )
    await expectSettled(h)
  })
})

describe('commitOn', () => {
  it('decides what commits: here 4xx rolls back too, and a thrown 409 commits', async () => {
    const app = track(Fastify())
    await app.register(scopedSession, {
      scope: h.scope,
      commitOn: ({ status, error }) =>
        (error as { statusCode?: number } | undefined)?.statusCode === 409 ||
        (error === undefined && status < 400),
    })
    app.get('/404', async (_request, reply) => {
      await insert('custom-404')
      return reply.code(404).send()
    })
    app.get('/409', async () => {
      await insert('custom-409')
      throw Object.assign(new Error('already there'), { statusCode: 409 })
    })
    app.get('/200', async () => {
      await insert('custom-200')
      return { ok: true }
    })
    const { base } = await listen(app)
    expect((await fetch(`${base}/404`)).status).toBe(404)
    expect((await fetch(`${base}/409`)).status).toBe(409)
    expect((await fetch(`${base}/200`)).status).toBe(200)
    expect(await rowsOf('custom-404')).toBe(0)
    expect(await rowsOf('custom-409')).toBe(1)
    expect(await rowsOf('custom-200')).toBe(1)
    await expectSettled(h)
  })

  it('a commitOn that does not return a boolean (an async one) rolls back and answers 500 saying why', async () => {
    const app = track(Fastify())
    await app.register(scopedSession, {
      scope: h.scope,
      commitOn: (async () => true) as never,
    })
    app.get('/', async () => {
      await insert('async-commit-on')
      return { ok: true }
    })
    const { base } = await listen(app)
    const res = await fetch(base)
    expect(res.status).toBe(500)
    expect(((await res.json()) as { message: string }).message).toMatch(
      /commitOn must be synchronous/,
    )
    expect(await rowsOf('async-commit-on')).toBe(0)
    await expectSettled(h)
  })
})

describe('lifecycle edges', () => {
  it('a closing scope refuses new requests with a 503', async () => {
    const pool = new pg.Pool({ connectionString: h.url, max: 1 })
    const scope = createScope({ driver: pgDriver(pool), name: 'closing', default: false })
    const app = track(Fastify())
    await app.register(scopedSession, { scope })
    app.get('/', async () => ({ ok: true }))
    const { base } = await listen(app)
    expect((await fetch(base)).status).toBe(200)
    await scope.close()
    const res = await fetch(base)
    expect(res.status).toBe(503)
    expect(((await res.json()) as { message: string }).message).toMatch(/scope 'closing' is closed/)
  })

  it('routes declared before the plugin finished loading are reported once, with the fix', async () => {
    const lines: string[] = []
    const stream = new Writable({
      write(chunk, _enc, cb) {
        lines.push(String(chunk))
        cb()
      },
    })
    const app = track(Fastify({ logger: { level: 'warn', stream } }))
    // Not awaited: the route below is declared before the plugin's onRoute hook exists.
    app.register(scopedSession, { scope: h.scope })
    app.get('/early', async () => {
      await insert('early')
      return { name: h.scope.getSession().name }
    })
    const { base } = await listen(app)
    expect(await (await fetch(`${base}/early`)).json()).toEqual({ name: 'GET /early' })
    await fetch(`${base}/early`)
    const warnings = lines.filter((l) =>
      l.includes('declared before scopedSession finished loading'),
    )
    expect(warnings).toHaveLength(1)
    expect(warnings[0]).toMatch(
      /await app\.register\(scopedSession, \.\.\.\) before declaring routes/,
    )
    expect(await rowsOf('early')).toBe(2)
    await expectSettled(h)
  })
})
