/**
 * 2,000 requests, 32 at a time, a random mix of every way a request can end.
 * Afterwards every committed row belongs to a request that got a 2xx/4xx,
 * every such request's row is there, nothing else is, each request released
 * at most one connection exactly once, and the pool is idle. Run for both
 * entry points (each request followed by its `x-test-id`).
 */
import http from 'node:http'
import { Hono } from 'hono'
import { HTTPException } from 'hono/http-exception'
import { stream } from 'hono/streaming'
import { timeout } from 'hono/timeout'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
// mulberry32: small, seeded, good enough to pick modes and delays reproducibly.
import { random } from '../../../test/reliability/support/load.ts'
import {
  aborted,
  type Db,
  database,
  entries,
  independentQuery,
  type Running,
  settled,
} from './support.ts'

const REQUESTS = 2_000
const CONCURRENCY = 32
const modes = [
  'ok',
  'notfound',
  'stream',
  'throw',
  'throw-value',
  'fail500',
  'abort',
  'timeout',
] as const
/**
 * scopedFetch's own: a synchronous route that never queries (its synchronous path), and a
 * thrown Error that app.onError answers with a 400 (rolls back whatever the status).
 */
const fetchModes = ['sync', 'answered'] as const
type Mode = (typeof modes)[number] | (typeof fetchModes)[number]

/** The modes each entry runs, and the endings each run must have seen. */
const runs = entries.map((e) =>
  e.kind === 'fetch'
    ? { ...e, modes: [...modes, ...fetchModes], endings: [200, 400, 404, 500, 504, 'aborted'] }
    : { ...e, modes: [...modes], endings: [200, 404, 500, 504, 'aborted'] },
) satisfies { modes: Mode[]; endings: (number | 'aborted')[] }[]

describe.each(runs)('$title', (m) => {
  let d: Db
  let server: Running

  beforeAll(async () => {
    d = await database(m.db('soak'), {
      max: 10,
      setup: 'CREATE TABLE items (id text PRIMARY KEY)',
    })
    const insert = (id: string) => d.db.query('INSERT INTO items (id) VALUES ($1)', [id])
    const app = new Hono()
    app.onError((err, c) => {
      if (err instanceof HTTPException) return err.getResponse()
      if (err.message === 'answer 400') return c.text('bad request', 400)
      return c.text('Internal Server Error', 500)
    })
    m.mount(app, d.scope)
    app.use('/timeout/*', timeout(40))

    app.post('/ok/:id', async (c) => {
      await insert(c.req.param('id'))
      return c.json({ ok: true })
    })
    app.post('/notfound/:id', async (c) => {
      await insert(c.req.param('id'))
      return c.text('gone', 404)
    })
    app.post('/stream/:id', (c) =>
      stream(c, async (s) => {
        await s.write('a')
        await insert(c.req.param('id'))
        await s.write('b')
      }),
    )
    app.post('/sync/:id', (c) => c.text('no statement'))
    app.post('/answered/:id', async (c) => {
      await insert(c.req.param('id'))
      throw new Error('answer 400')
    })
    app.post('/throw/:id', async (c) => {
      await insert(c.req.param('id'))
      throw new Error('handler failed')
    })
    app.post('/throw-value/:id', async (c) => {
      await insert(c.req.param('id'))
      throw 'not an Error'
    })
    app.post('/fail500/:id', async (c) => {
      await insert(c.req.param('id'))
      return c.text('failed', 500)
    })
    app.post('/abort/:id', async (c) => {
      const session = d.scope.getSession()
      await insert(c.req.param('id'))
      // Never answers: waits until the client has gone, then tries one more statement (it fails).
      await aborted(session.signal)
      await d.db.query('SELECT 1')
      return c.text('unreachable')
    })
    app.post('/timeout/:id', async (c) => {
      await insert(c.req.param('id'))
      await d.db.query('SELECT pg_sleep(5)')
      return c.text('too late')
    })
    server = await m.listen(app)
  })

  afterAll(async () => {
    await server?.close()
    await d?.close()
  })

  function call(
    agent: http.Agent,
    mode: Mode,
    id: string,
    abortAfterMs: number,
  ): Promise<number | 'aborted'> {
    return new Promise((resolve) => {
      const req = http.request({
        host: '127.0.0.1',
        port: server.port,
        method: 'POST',
        path: `/${mode}/${id}`,
        headers: { 'x-test-id': id, 'content-length': 0 },
        // An abort destroys its socket, so it gets one of its own.
        agent: mode === 'abort' ? false : agent,
      })
      req.on('error', () => resolve('aborted'))
      req.on('response', (res) => {
        res.resume()
        res.on('end', () => resolve(res.statusCode ?? 0))
        res.on('error', () => resolve('aborted'))
      })
      req.end()
      if (mode === 'abort') setTimeout(() => req.destroy(), abortAfterMs)
    })
  }

  it(`soak: ${REQUESTS} requests, ${CONCURRENCY} concurrent, mixed outcomes; commits match 2xx/4xx exactly`, async () => {
    const seed = Date.now()
    const rand = random(seed)
    const plan = Array.from({ length: REQUESTS }, (_, i) => ({
      id: `r${i}`,
      mode: m.modes[Math.floor(rand() * m.modes.length)]!,
      abortAfterMs: Math.floor(rand() * 15),
    }))
    const outcome = new Map<string, number | 'aborted'>()
    const t = m.tally(d.scope.name)
    const agent = new http.Agent({ keepAlive: true, maxSockets: CONCURRENCY })
    let next = 0
    await Promise.all(
      Array.from({ length: CONCURRENCY }, async () => {
        while (next < plan.length) {
          const p = plan[next++]!
          outcome.set(p.id, await call(agent, p.mode, p.id, p.abortAfterMs))
        }
      }),
    )
    agent.destroy()
    await settled(d)
    t.stop()

    const committed = new Set(
      (await independentQuery<{ id: string }>(d.url, 'SELECT id FROM items')).map((r) => r.id),
    )
    const problems: string[] = []
    for (const p of plan) {
      const o = outcome.get(p.id)
      // Rows are committed for a 2xx/4xx, except a thrown Error answered with one; 'sync' inserts none.
      const answered =
        typeof o === 'number' && o < 500 && p.mode !== 'answered' && p.mode !== 'sync'
      if (committed.has(p.id) !== answered) {
        problems.push(
          `${p.id} (${p.mode}) got ${o} but its row is ${committed.has(p.id) ? 'committed' : 'absent'}`,
        )
      }
      const acquires = t.acquiresOf(p.id)
      const releases = t.releasesOf(p.id)
      if (p.mode === 'sync' && (acquires !== 0 || o !== 200)) {
        problems.push(`${p.id} (sync): ${acquires} checkouts, status ${o}`)
      }
      if (p.mode === 'answered' && typeof o === 'number' && o !== 400) {
        problems.push(`${p.id} (answered): status ${o}`)
      }
      if (acquires > 1 || releases !== acquires) {
        problems.push(`${p.id} (${p.mode}): ${acquires} checkouts, ${releases} releases`)
      }
    }
    expect(problems, `seed ${seed}`).toEqual([])

    // Every kind of ending really happened in this run.
    const statuses = new Set([...outcome.values()])
    for (const s of m.endings) expect(statuses.has(s), `seed ${seed}: saw ${s}`).toBe(true)
    expect(committed.size).toBeGreaterThan(0)

    expect(d.scope.stats().open).toBe(0)
    expect(d.pool.totalCount).toBe(d.pool.idleCount)
    const leaked = await independentQuery(
      d.url,
      "SELECT pid FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' AND datname = current_database()",
    )
    expect(leaked).toEqual([])
  })
})
