/**
 * Problem 5 of the design, for idle connections: a pooled client whose
 * backend died while it sat in the pool must never reach a request.
 *
 * - Terminated with notice (pg_terminate_backend, a clean server shutdown):
 *   the client hears it, the pool drops it, pgDriver reports it via onIdleError.
 * - Killed silently (NAT timeout, failover: the client hears nothing until it
 *   writes): validateIdleMs checks it with SELECT 1 before handing it out.
 *   With validation off, the first statement of the next scope fails instead:
 *   that is the contrast that shows the option works.
 */
import { createScope } from '@scoped/core'
import { pgDriver } from '@scoped/pg'
import pg from 'pg'
import { afterEach, beforeAll, describe, expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import { startTcpProxy, type TcpProxy } from './tcp-proxy.ts'

let url: string
const cleanup: (() => Promise<void>)[] = []

beforeAll(async () => {
  url = await testDatabase('pg_idle_validation')
})

afterEach(async () => {
  for (const fn of cleanup.splice(0).reverse()) await fn()
})

let n = 0
function setup(connectTo: string, options: Parameters<typeof pgDriver>[1]) {
  const pool = new pg.Pool({
    connectionString: connectTo,
    application_name: `pg_idle_${process.pid}_${++n}`,
    max: 1,
  })
  let connects = 0
  pool.on('connect', () => {
    connects++
  })
  const scope = createScope({ driver: pgDriver(pool, options), default: false, name: 'idle' })
  cleanup.push(() => scope.close())
  const pid = () =>
    scope.run(() =>
      scope
        .getSession()
        .use(async (c) => (await c.query('SELECT pg_backend_pid() AS pid')).rows[0].pid as number),
    )
  return { pool, scope, pid, connects: () => connects }
}

async function proxy(): Promise<TcpProxy> {
  const p = await startTcpProxy(url)
  cleanup.push(() => p.close())
  return p
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

describe('a pooled client whose backend died while idle', () => {
  it('terminated with notice: dropped from the pool and reported; the next scope works on the first try', async () => {
    const idleErrors: Error[] = []
    const { pool, scope, pid, connects } = setup(url, {
      validateIdleMs: 0,
      onIdleError: (e) => idleErrors.push(e),
    })
    const first = await pid()
    await independentQuery(url, 'SELECT pg_terminate_backend($1)', [first])
    for (let i = 0; i < 100 && pool.totalCount > 0; i++) await sleep(10)
    expect(pool.totalCount).toBe(0)
    expect(idleErrors).toHaveLength(1)
    expect(idleErrors[0]!.message).toContain('terminating connection due to administrator command')

    const second = await pid()
    expect(second).not.toBe(first)
    expect(connects()).toBe(2)
    expect(scope.stats().totals.destroyed).toBe(0)
  })

  it('killed silently: validateIdleMs catches it, and the next scope works on the first try', async () => {
    const p = await proxy()
    const { pool, scope, pid, connects } = setup(p.url, { validateIdleMs: 20 })
    const first = await pid()
    await p.silentlyKillAll()
    await sleep(50)
    // The client did not notice: it is still in the pool, looking fine.
    expect(pool.totalCount).toBe(1)
    expect(pool.idleCount).toBe(1)

    const attempts: number[] = []
    const second = await scope.run(async () => {
      attempts.push(1)
      return scope
        .getSession()
        .use(async (c) => (await c.query('SELECT pg_backend_pid() AS pid')).rows[0].pid as number)
    })
    expect(attempts).toHaveLength(1)
    expect(second).not.toBe(first)
    expect(connects()).toBe(2)
    expect(pool.totalCount).toBe(1)
    expect(pool.idleCount).toBe(1)
  })

  it('killed silently with validation off: the next scope fails once, the dead client is destroyed, the one after works', async () => {
    const p = await proxy()
    const { pool, scope, pid } = setup(p.url, { validateIdleMs: 0 })
    await pid()
    await p.silentlyKillAll()
    const err = await pid().catch((e) => e)
    expect(err).toBeInstanceOf(Error)
    expect(scope.stats().totals.destroyed).toBe(1)
    expect(pool.totalCount).toBe(0)
    expect(await pid()).toBeTypeOf('number')
    expect(pool.totalCount).toBe(1)
    expect(pool.idleCount).toBe(1)
  })
})
