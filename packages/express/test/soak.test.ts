/**
 * 2,000 requests at 32 concurrent connections, a random mix of success,
 * 404, throws, 5xx, streamed bodies, client aborts and socket timeouts, against
 * a pool smaller than the concurrency. Afterwards: every committed row belongs
 * to a request that was answered below 500, none to a rolled-back one, every
 * checkout was released exactly once, and the pool is idle.
 */
import dc from 'node:diagnostics_channel'
import http from 'node:http'
import { scopedSession } from '@scoped/express'
import express, { type NextFunction, type Request, type Response } from 'express'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import { type Db, listen, makeDb, openTransactions, settled } from './support.ts'

const TOTAL = 2_000
const CONCURRENCY = 32
const kinds = [
  'ok',
  'ok',
  'ok',
  'not-found',
  'stream',
  'throw',
  'throw-async',
  'next-error',
  'fail-5xx',
  'abort',
  'abort',
  'timeout',
] as const
type Kind = (typeof kinds)[number]

let url: string
let d: Db

beforeAll(async () => {
  url = await testDatabase('express_soak')
  await independentQuery(url, 'CREATE TABLE soak (id text PRIMARY KEY, kind text NOT NULL)')
  d = makeDb(url, 'express_soak', { poolMax: 8 })
})

afterAll(async () => {
  await d.close()
})

/** A small seeded generator, so a failing mix can be replayed (the seed is in the test name). */
function random(seed: number): () => number {
  let s = seed >>> 0
  return () => {
    s = (Math.imul(s, 1_664_525) + 1_013_904_223) >>> 0
    return s / 2 ** 32
  }
}

const seed = Number(process.env.SOAK_SEED ?? Date.now() % 100_000)

describe('soak', () => {
  it(`${TOTAL} requests, ${CONCURRENCY} at a time, random outcomes (seed ${seed})`, async () => {
    const rand = random(seed)
    const insert = (id: string, kind: string) =>
      d.db.query('INSERT INTO soak (id, kind) VALUES ($1, $2)', [id, kind])
    const sleep = (s: number) => d.db.query('SELECT pg_sleep($1)', [s])

    // What the server finished sending, per request: a response lost in flight after its
    // COMMIT (the client aborted just then) is committed and answered, as far as anyone can tell.
    const serverFinished = new Map<string, number>()
    const app = express()
    app.use(scopedSession(d.scope))
    app.post('/soak/:kind/:id', async (req: Request, res: Response, next: NextFunction) => {
      const { kind, id } = req.params as { kind: Kind; id: string }
      res.on('finish', () => serverFinished.set(id, res.statusCode))
      await insert(id, kind)
      switch (kind) {
        case 'ok':
          return void res.json({ id })
        case 'not-found':
          return void res.status(404).json({ id })
        case 'stream':
          res.write('a')
          await d.db.query('SELECT 1')
          res.write('b')
          return void res.end('c')
        case 'throw':
          throw new Error('boom')
        case 'throw-async':
          await sleep(0.001)
          throw 'not an Error'
        case 'next-error':
          return next(new Error('passed on'))
        case 'fail-5xx':
          return void res.status(503).json({ id })
        case 'abort':
          // The client gives up while this runs.
          await sleep(0.1)
          return void res.json({ id })
        case 'timeout':
          res.setTimeout(20)
          await sleep(0.1)
          return void res.json({ id })
      }
    })
    app.use((_err: unknown, _req: Request, res: Response, _next: NextFunction) => {
      if (!res.headersSent) res.status(500).send('error')
    })
    const srv = await listen(app)

    let acquired = 0
    let released = 0
    const onAcquire = (m: unknown) => {
      if ((m as { scope: string }).scope === d.scope.name) acquired++
    }
    const onRelease = (m: unknown) => {
      if ((m as { scope: string }).scope === d.scope.name) released++
    }
    dc.subscribe('scoped:acquire', onAcquire)
    dc.subscribe('scoped:release', onRelease)
    const warnings: string[] = []
    const onWarning = (w: Error) => warnings.push(`${w.name}: ${w.message}`)
    process.on('warning', onWarning)

    const agent = new http.Agent({ keepAlive: true, maxSockets: CONCURRENCY })
    const outcome = new Map<string, { kind: Kind; status: number | 'error' }>()
    const send = (kind: Kind, id: string) =>
      new Promise<number | 'error'>((resolve) => {
        let done = false
        const finish = (v: number | 'error') => {
          if (done) return
          done = true
          resolve(v)
        }
        const req = http.request(`${srv.url}/soak/${kind}/${id}`, { method: 'POST', agent })
        req.on('response', (res) => {
          res.resume()
          res.on('end', () => finish(res.complete ? (res.statusCode ?? 0) : 'error'))
          res.on('aborted', () => finish('error'))
          res.on('error', () => finish('error'))
        })
        req.on('error', () => finish('error'))
        req.end()
        if (kind === 'abort') setTimeout(() => req.destroy(), Math.floor(rand() * 40))
      })

    let next = 0
    const worker = async () => {
      while (next < TOTAL) {
        const n = next++
        const kind = kinds[Math.floor(rand() * kinds.length)]!
        const id = `r${n}`
        outcome.set(id, { kind, status: await send(kind, id) })
      }
    }
    try {
      await Promise.all(Array.from({ length: CONCURRENCY }, worker))
      await settled(d)
    } finally {
      agent.destroy()
      dc.unsubscribe('scoped:acquire', onAcquire)
      dc.unsubscribe('scoped:release', onRelease)
      process.off('warning', onWarning)
      await srv.close()
    }

    const rows = await independentQuery<{ id: string }>(url, 'SELECT id FROM soak')
    const committed = new Set(rows.map((r) => r.id))
    const problems: string[] = []
    const tally: Record<string, number> = {}
    for (const [id, { kind, status }] of outcome) {
      const answered = typeof status === 'number' && status < 500
      const label = `${kind}:${status === 'error' ? 'error' : `${Math.floor(status / 100)}xx`}`
      tally[label] = (tally[label] ?? 0) + 1
      if (answered && !committed.has(id))
        problems.push(`${id} (${kind}) got ${status} but its row is missing`)
      if (!answered && committed.has(id)) {
        const sent = serverFinished.get(id)
        // Only a response whose COMMIT finished and that was on its way may be committed.
        if (!(sent !== undefined && sent < 500 && status === 'error')) {
          problems.push(`${id} (${kind}) got ${status} but its row was committed`)
        }
      }
    }
    expect(problems, `seed ${seed}`).toEqual([])
    for (const id of committed) expect(outcome.has(id)).toBe(true)
    console.log(`soak seed ${seed}: ${JSON.stringify(tally)}`)
    // Every kind happened, including both endings of the races.
    for (const k of [
      'ok:2xx',
      'not-found:4xx',
      'stream:2xx',
      'throw:5xx',
      'fail-5xx:5xx',
      'abort:error',
      'timeout:error',
    ]) {
      expect(tally[k], `${k} in ${JSON.stringify(tally)}`).toBeGreaterThan(0)
    }
    expect(outcome.size).toBe(TOTAL)
    expect(released).toBe(acquired)
    expect(d.scope.stats().totals.acquired).toBe(acquired)
    expect(d.pool.totalCount).toBe(d.pool.idleCount)
    expect(await openTransactions(url, d)).toEqual([])
    expect(warnings).toEqual([])
  })
})
