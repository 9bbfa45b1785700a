/**
 * DESIGN.md, Adapters: the Express 5 lifecycle facts the middleware relies on, checked on
 * Express itself (no middleware of ours, no database) with a real HTTP server on 127.0.0.1.
 *
 * "Express 5: a middleware cannot await the handler; commit by holding back res.end until
 * the commit settles. In all three, 'close' on the raw response fired on every path,
 * aborts and timeouts included: use it as the backstop."
 */
import type { Server } from 'node:http'
import { request as httpRequest } from 'node:http'
import type { AddressInfo } from 'node:net'
import express from 'express'
import { afterEach, describe, expect, it } from 'vitest'

const servers: Server[] = []
afterEach(async () => {
  for (const s of servers.splice(0)) {
    s.closeAllConnections()
    await new Promise((r) => s.close(r))
  }
})

function until(ok: () => boolean, ms = 3_000): Promise<void> {
  const deadline = Date.now() + ms
  return new Promise((resolve, reject) => {
    const tick = () => {
      if (ok()) resolve()
      else if (Date.now() > deadline) reject(new Error('condition not met in time'))
      else setTimeout(tick, 5)
    }
    tick()
  })
}

function start(app: express.Express, timeoutMs = 0): Promise<number> {
  return new Promise((resolve) => {
    const server = app.listen(0, '127.0.0.1', () => resolve((server.address() as AddressInfo).port))
    if (timeoutMs > 0) server.setTimeout(timeoutMs)
    servers.push(server)
  })
}

describe('Express 5 lifecycle facts (DESIGN.md, Adapters)', () => {
  it('next() does not return the async handler’s promise: a middleware cannot await the handler', async () => {
    const app = express()
    let returned: unknown = 'unset'
    let handlerDone = false
    app.use((_req, _res, next) => {
      returned = next()
    })
    app.get('/', async (_req, res) => {
      await new Promise((r) => setTimeout(r, 20))
      handlerDone = true
      res.send('ok')
    })
    const port = await start(app)
    const res = await fetch(`http://127.0.0.1:${port}/`)
    expect(await res.text()).toBe('ok')
    expect(handlerDone).toBe(true)
    expect(returned).toBeUndefined()
  })

  it("'close' on the raw response fires once on every path: 200, thrown error, 5xx, client abort, server timeout", async () => {
    const closes = new Map<string, number>()
    const gates: (() => void)[] = []
    const app = express()
    app.use((req, res, next) => {
      res.on('close', () => closes.set(req.path, (closes.get(req.path) ?? 0) + 1))
      next()
    })
    app.get('/ok', (_req, res) => {
      res.send('ok')
    })
    app.get('/throw', async () => {
      throw new Error('handler failed')
    })
    app.get('/503', (_req, res) => {
      res.status(503).send('down')
    })
    app.get('/hang', async (_req, res) => {
      await new Promise<void>((r) => gates.push(r))
      if (!res.writableEnded) res.send('late')
    })
    const port = await start(app, 200)
    const statuses: Record<string, string> = {}
    for (const path of ['/ok', '/throw', '/503']) {
      statuses[path] = String((await fetch(`http://127.0.0.1:${port}${path}`)).status)
    }
    // A client abort: the socket goes away before the answer.
    await new Promise<void>((resolve) => {
      const req = httpRequest({ host: '127.0.0.1', port, path: '/hang' })
      req.on('error', () => resolve())
      req.end()
      setTimeout(() => {
        req.destroy()
        resolve()
      }, 50)
    })
    await until(() => closes.get('/hang') === 1)
    // A server timeout (server.setTimeout 200 ms) under a handler that never answers.
    const timedOut = fetch(`http://127.0.0.1:${port}/hang?timeout`).then(
      (r) => `status ${r.status}`,
      () => 'network error',
    )
    await until(() => closes.get('/hang') === 2, 5_000)
    for (const open of gates) open()
    expect(await timedOut).toBe('network error')
    await new Promise((r) => setTimeout(r, 50))
    expect(statuses).toEqual({ '/ok': '200', '/throw': '500', '/503': '503' })
    expect(Object.fromEntries(closes)).toEqual({ '/ok': 1, '/throw': 1, '/503': 1, '/hang': 2 })
  })
})
