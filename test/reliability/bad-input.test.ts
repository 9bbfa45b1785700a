/**
 * Bad input to every public function and option: wrong types, negative
 * numbers, NaN, undefined where required, a closed pool, objects that only
 * look like a pool. Each must be refused with an error that names the
 * argument, and none may check a connection out: the pool under test never
 * opens one, and PostgreSQL never sees its application_name.
 *
 * A real pool from another copy of `pg` (the workspace has pg 8.20 beside
 * 8.23) is not bad input: it is accepted and works.
 */
import { readdirSync } from 'node:fs'
import { createRequire } from 'node:module'
import { join, sep } from 'node:path'
import { createScope, getSession, runJob, type Scope, type ScopeOptions } from '@scoped/core'
import { scopedSession as expressSession } from '@scoped/express'
import { scopedSession as fastifySession } from '@scoped/fastify'
import { scopedSession as honoSession } from '@scoped/hono'
import { pgDriver, scopedPool } from '@scoped/pg'
import Fastify from 'fastify'
import pg from 'pg'
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { backends, independentQuery, testDatabase } from '../support/db.ts'
import { record } from './support/report.ts'

let url: string
let pool: pg.Pool
let scope: Scope<pg.PoolClient>
let connects = 0
const app = `rel_bad_input_${process.pid}`
const started = performance.now()
const results: { call: string; ok: boolean; message: string }[] = []

beforeAll(async () => {
  url = await testDatabase('rel_bad_input')
})

// A fresh pool and scope for each call, so one that checks a connection out is caught alone.
beforeEach(() => {
  pool = new pg.Pool({ connectionString: url, application_name: app, max: 2 })
  pool.on('connect', () => {
    connects++
  })
  scope = createScope({ driver: pgDriver(pool), name: 'bad-input', default: false })
})

afterEach(async () => {
  await scope.close()
})

afterAll(async () => {
  // Nothing above checked a connection out of the pool under test, or reached the server with it.
  expect(connects).toBe(0)
  expect(await backends(url, app)).toEqual([])
  const failed = results.filter((r) => !r.ok)
  record({
    scenario: 'bad input',
    adapter: 'all',
    load: `${results.length} calls with bad arguments: core, pg, hono, fastify, express`,
    faults:
      'wrong types, negative numbers, NaN, undefined where required, unknown keys, a closed pool, pool-like objects',
    failed: failed.length,
    why: `${results.length - failed.length} refused with an error naming the argument; connections opened by them: ${connects}`,
    leaked: connects,
    lost: 0,
    durationMs: performance.now() - started,
    problems: failed.map((f) => `${f.call}: ${f.message}`),
  })
})

/**
 * `pg` from another install in the pnpm store (pg-boss brings 8.20), or, if there is none, a
 * second instance of this one loaded past the module cache: either way other classes.
 */
function otherPg(): typeof pg {
  const require = createRequire(import.meta.url)
  const store = join(process.cwd(), 'node_modules', '.pnpm')
  const mine = (require('pg/package.json') as { version: string }).version
  const dir = readdirSync(store).find((d) => /^pg@\d/.test(d) && d !== `pg@${mine}`)
  if (dir) return require(join(store, dir, 'node_modules', 'pg')) as typeof pg
  const main = require.resolve('pg')
  const cached = Object.keys(require.cache).filter((k) => k.includes(`${sep}pg${sep}`))
  const saved = cached.map((k) => [k, require.cache[k]] as const)
  for (const k of cached) delete require.cache[k]
  try {
    return require(main) as typeof pg
  } finally {
    for (const [k, m] of saved) require.cache[k] = m
  }
}

const fn = async () => {}
const nan = Number.NaN

/**
 * `call()` must throw (or reject) an Error whose message matches `names`, and
 * leave the pool untouched.
 */
async function refuses(label: string, call: () => unknown, names: RegExp): Promise<void> {
  let error: unknown
  try {
    const r = call()
    if (r && typeof (r as Promise<unknown>).then === 'function') await r
  } catch (e) {
    error = e
  }
  const message = error instanceof Error ? error.message : `accepted (${String(error)})`
  const ok = error instanceof Error && names.test(message) && pool.totalCount === 0
  results.push({ call: label, ok, message: message.split('\n')[0]!.slice(0, 200) })
  expect(error, `${label} was accepted`).toBeInstanceOf(Error)
  expect(message, label).toMatch(names)
  expect(pool.totalCount, `${label} checked a connection out`).toBe(0)
}

const opts = (extra: Record<string, unknown>) => () =>
  createScope({ driver: pgDriver(pool), default: false, ...extra } as ScopeOptions<pg.PoolClient>)

describe('@scoped/core', () => {
  it.each([
    ['createScope()', () => createScope(undefined as never), /createScope\(options\)/],
    ['createScope(null)', () => createScope(null as never), /createScope\(options\)/],
    ['createScope({ driver: undefined })', opts({ driver: undefined }), /driver/],
    ['createScope({ driver: pool })', opts({ driver: pool }), /driver/],
    ['acquireTimeoutMs: -1', opts({ acquireTimeoutMs: -1 }), /acquireTimeoutMs/],
    ['acquireTimeoutMs: NaN', opts({ acquireTimeoutMs: nan }), /acquireTimeoutMs/],
    [
      'acquireTimeoutMs: Infinity',
      opts({ acquireTimeoutMs: Number.POSITIVE_INFINITY }),
      /acquireTimeoutMs/,
    ],
    ["acquireTimeoutMs: '100'", opts({ acquireTimeoutMs: '100' }), /acquireTimeoutMs/],
    ['leakDetectionMs: -1', opts({ leakDetectionMs: -1 }), /leakDetectionMs/],
    ['maxHoldMs: NaN', opts({ maxHoldMs: nan }), /maxHoldMs/],
    ["captureStacks: 'yes'", opts({ captureStacks: 'yes' }), /captureStacks/],
    ['default: 1', opts({ default: 1 }), /default/],
    ["transaction: 'always'", opts({ transaction: 'always' }), /transaction/],
    ['name: 42', opts({ name: 42 }), /name/],
    ["onError: 'log'", opts({ onError: 'log' }), /onError/],
    ['logger: {}', opts({ logger: {} }), /logger/],
    ['an unknown option', opts({ acquireTimeout: 5 }), /acquireTimeout/],
  ])('%s', (label, call, names) => refuses(label, call, names))

  it.each([
    ['run(undefined)', () => scope.run(undefined as never), /fn/],
    ["run('sql')", () => scope.run('SELECT 1' as never), /fn/],
    ['run(fn, null)', () => scope.run(fn, null as never), /opts/],
    ['run(fn, { name: 5 })', () => scope.run(fn, { name: 5 as never }), /name/],
    ['run(fn, { signal: {} })', () => scope.run(fn, { signal: {} as never }), /signal/],
    [
      "run(fn, { transaction: 'yes' })",
      () => scope.run(fn, { transaction: 'yes' as never }),
      /transaction/,
    ],
    ['runJob(fn, { timeoutMs: -1 })', () => scope.runJob(fn, { timeoutMs: -1 }), /timeoutMs/],
    ['runJob(fn, { timeoutMs: NaN })', () => scope.runJob(fn, { timeoutMs: nan }), /timeoutMs/],
    ['runJob(undefined)', () => scope.runJob(undefined as never), /fn/],
    ['loop(fn)', () => scope.loop(fn, undefined as never), /opts/],
    ['loop(fn, {})', () => scope.loop(fn, {} as never), /signal/],
    [
      'loop(fn, { intervalMs: NaN })',
      () => scope.loop(fn, { signal: new AbortController().signal, intervalMs: nan }),
      /intervalMs/,
    ],
    [
      'loop(fn, { backoff: { initialMs: -1 } })',
      () => scope.loop(fn, { signal: new AbortController().signal, backoff: { initialMs: -1 } }),
      /initialMs/,
    ],
    [
      'loop(fn, { backoff: { maxMs < initialMs } })',
      () =>
        scope.loop(fn, {
          signal: new AbortController().signal,
          backoff: { initialMs: 100, maxMs: 10 },
        }),
      /maxMs/,
    ],
    ['open(null)', () => scope.open(null as never), /opts/],
    ["open({ name: '' })", () => scope.open({ name: '' }), /name/],
    ['close({ timeoutMs: -1 })', () => scope.close({ timeoutMs: -1 }), /timeoutMs/],
    ['close({ timeoutMs: NaN })', () => scope.close({ timeoutMs: nan }), /timeoutMs/],
    ['getSession() without a default scope', () => getSession(), /default scope/],
    ['runJob() without a default scope', () => runJob(fn), /default scope/],
  ])('%s', (label, call, names) => refuses(label, call, names))

  it.each([
    [
      'use(undefined)',
      (s: ReturnType<Scope<pg.PoolClient>['getSession']>) => s.use(undefined as never),
      /use\(fn\)/,
    ],
    [
      "use('SELECT 1')",
      (s: ReturnType<Scope<pg.PoolClient>['getSession']>) => s.use('SELECT 1' as never),
      /use\(fn\)/,
    ],
    [
      'transaction(undefined)',
      (s: ReturnType<Scope<pg.PoolClient>['getSession']>) => s.transaction(undefined as never),
      /transaction\(fn\)/,
    ],
    [
      "transaction(fn, { isolation: 'snapshot' })",
      (s: ReturnType<Scope<pg.PoolClient>['getSession']>) =>
        s.transaction(fn, { isolation: 'snapshot' as never }),
      /isolation/,
    ],
    [
      'transaction(fn, { retry: { attempts: 0 } })',
      (s: ReturnType<Scope<pg.PoolClient>['getSession']>) =>
        s.transaction(fn, { retry: { attempts: 0 } }),
      /attempts/,
    ],
    [
      'transaction(fn, { readOnly: 1 })',
      (s: ReturnType<Scope<pg.PoolClient>['getSession']>) =>
        s.transaction(fn, { readOnly: 1 as never }),
      /readOnly/,
    ],
    [
      "afterCommit('x')",
      (s: ReturnType<Scope<pg.PoolClient>['getSession']>) => s.afterCommit('x' as never),
      /afterCommit\(fn\)/,
    ],
    [
      'afterRollback(null)',
      (s: ReturnType<Scope<pg.PoolClient>['getSession']>) => s.afterRollback(null as never),
      /afterRollback\(fn\)/,
    ],
  ])('session.%s', (label, call, names) =>
    refuses(
      `session.${label}`,
      () => scope.run(async () => call(scope.getSession()), { transaction: 'none' }),
      names,
    ),
  )
})

describe('@scoped/pg', () => {
  it.each([
    ['pgDriver()', () => pgDriver(undefined as never), /pgDriver\(pool\)/],
    [
      'pgDriver(connection string)',
      () => pgDriver('postgres://localhost/db' as never),
      /pgDriver\(pool\)/,
    ],
    [
      'pgDriver(pg.Client)',
      () => pgDriver(new pg.Client({ connectionString: url }) as never),
      /pgDriver\(pool\)/,
    ],
    [
      'pgDriver({ acquire, release })',
      () => pgDriver({ acquire: fn, release: fn } as never),
      /pgDriver\(pool\)/,
    ],
    ['pgDriver(pool, null)', () => pgDriver(pool, null as never), /options/],
    [
      'statementTimeoutMs: -1',
      () => pgDriver(pool, { statementTimeoutMs: -1 }),
      /statementTimeoutMs/,
    ],
    [
      'statementTimeoutMs: 1.5',
      () => pgDriver(pool, { statementTimeoutMs: 1.5 }),
      /statementTimeoutMs/,
    ],
    [
      'statementTimeoutMs: NaN',
      () => pgDriver(pool, { statementTimeoutMs: nan }),
      /statementTimeoutMs/,
    ],
    [
      "statementTimeoutMs: '5s'",
      () => pgDriver(pool, { statementTimeoutMs: '5s' as never }),
      /statementTimeoutMs/,
    ],
    ["applicationName: ''", () => pgDriver(pool, { applicationName: '' }), /applicationName/],
    [
      'applicationName: 7',
      () => pgDriver(pool, { applicationName: 7 as never }),
      /applicationName/,
    ],
    ['validateIdleMs: -1', () => pgDriver(pool, { validateIdleMs: -1 }), /validateIdleMs/],
    ['validateIdleMs: NaN', () => pgDriver(pool, { validateIdleMs: nan }), /validateIdleMs/],
    ["onIdleError: 'warn'", () => pgDriver(pool, { onIdleError: 'warn' as never }), /onIdleError/],
    [
      'an unknown option',
      () => pgDriver(pool, { statementTimeout: 5 } as never),
      /statementTimeout/,
    ],
    ['scopedPool()', () => scopedPool(undefined as never), /scopedPool\(scope\)/],
    ['scopedPool(pool)', () => scopedPool(pool as never), /scopedPool\(scope\)/],
    [
      'scopedPool(scope, null)',
      () => scopedPool(scope, null as never),
      /scopedPool\(scope, options\)/,
    ],
    [
      "scopedPool(scope, { outsideScope: 'ignore' })",
      () => scopedPool(scope, { outsideScope: 'ignore' as never }),
      /outsideScope/,
    ],
    [
      "scopedPool(scope, { outsideScope: 'pool' }) without a pool",
      () => scopedPool(scope, { outsideScope: 'pool' }),
      /pool/,
    ],
    [
      "scopedPool(scope, { outsideScope: 'pool', pool: 'url' })",
      () => scopedPool(scope, { outsideScope: 'pool', pool: 'postgres://x' as never }),
      /pool/,
    ],
    [
      'scopedPool(scope, { unknown })',
      () => scopedPool(scope, { outside: 'pool' } as never),
      /outside/,
    ],
    [
      'query() with a callback',
      () => scopedPool(scope).query('SELECT 1', (() => {}) as never),
      /callback/,
    ],
    [
      'query(undefined) in a scope',
      () => scope.run(() => scopedPool(scope).query(undefined as never)),
      /query\(text\)/,
    ],
    [
      'query(42) in a scope',
      () => scope.run(() => scopedPool(scope).query(42 as never)),
      /query\(text\)/,
    ],
    [
      'query({}) in a scope',
      () => scope.run(() => scopedPool(scope).query({} as never)),
      /query\(text\)/,
    ],
  ])('%s', (label, call, names) => refuses(label, call, names))

  it('a pool that was ended is refused when the driver is made, and a driver whose pool ends says so', async () => {
    const ended = new pg.Pool({ connectionString: url, application_name: app })
    await ended.end()
    await refuses('pgDriver(ended pool)', () => pgDriver(ended), /pgDriver\(pool\).*ended/)
    const later = new pg.Pool({ connectionString: url, application_name: app })
    const s = createScope({ driver: pgDriver(later), name: 'ends-later', default: false })
    await later.end()
    await refuses(
      'a query after pool.end()',
      () => s.run(() => s.getSession().use((c) => c.query('SELECT 1'))),
      /ended/,
    )
    await s.close()
  })

  it('a real pool from another copy of pg is accepted and works', async () => {
    const other = otherPg()
    expect(other.Pool).not.toBe(pg.Pool)
    const otherPool = new other.Pool({ connectionString: url, max: 1 })
    const s = createScope({
      driver: pgDriver(otherPool as unknown as pg.Pool),
      name: 'other-pg',
      default: false,
    })
    const n = await s.run(
      async () => (await scopedPool(s).query<{ n: number }>('SELECT 41 + 1 AS n')).rows[0]!.n,
    )
    expect(n).toBe(42)
    expect(otherPool.totalCount).toBe(otherPool.idleCount)
    await s.close()
    results.push({
      call: 'pgDriver(a pool from another copy of pg)',
      ok: true,
      message: 'accepted and works (not bad input)',
    })
  })
})

describe('adapters', () => {
  const cases = (
    label: string,
    make: (scope: unknown, options?: unknown) => unknown,
    nullOptions = true,
  ): [string, () => unknown, RegExp][] => [
    ...(nullOptions
      ? [
          [`${label}(scope, null)`, () => make(scope, null), /options/] as [
            string,
            () => unknown,
            RegExp,
          ],
        ]
      : []),
    [`${label}({})`, () => make({}), /scope/],
    [`${label}('scope')`, () => make('scope'), /scope/],
    [`${label}(scope, { name: 'x' })`, () => make(scope, { name: 'x' }), /name/],
    [`${label}(scope, { commitOn: true })`, () => make(scope, { commitOn: true }), /commitOn/],
    [
      `${label}(scope, { cancelOnAbort: 'yes' })`,
      () => make(scope, { cancelOnAbort: 'yes' }),
      /cancelOnAbort/,
    ],
    [`${label}(scope, { unknown })`, () => make(scope, { cancelOnAbrot: true }), /cancelOnAbrot/],
  ]
  const fastify = async (scope: unknown, options?: unknown) => {
    const f = Fastify()
    try {
      await f.register(fastifySession, { scope, ...(options as object) } as never)
      await f.ready()
    } finally {
      await f.close()
    }
  }
  it.each([
    ...cases('hono scopedSession', (s, o) => honoSession(s as never, o as never)),
    ...cases('express scopedSession', (s, o) => expressSession(s as never, o as never)),
    ...cases('fastify register(scopedSession, …)', fastify, false),
  ])('%s', (label, call, names) => refuses(label, call, names))
})

it('the database under test saw none of it', async () => {
  const rows = await independentQuery(
    url,
    'SELECT pid FROM pg_stat_activity WHERE application_name = $1',
    [app],
  )
  expect(rows).toEqual([])
})
