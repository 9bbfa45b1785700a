/**
 * Inputs that pgDriver and scopedPool used to accept silently (found by
 * test/reliability/bad-input.test.ts): an ended pool, scopedPool options that
 * are null, misspelt or not a pool, and a query without SQL, which checked a
 * connection out (and sent BEGIN) before pg refused it.
 */
import { createScope } from '@scoped/core'
import { pgDriver, scopedPool } from '@scoped/pg'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { backends, testDatabase } from '../../../test/support/db.ts'

let url: string
let pool: pg.Pool
let connects = 0
const app = `pg_bad_input_${process.pid}`

beforeAll(async () => {
  url = await testDatabase('pg_bad_input')
  pool = new pg.Pool({ connectionString: url, application_name: app, max: 2 })
  pool.on('connect', () => {
    connects++
  })
})

/** A pool of the test's application_name whose connections are counted. */
function fresh(): pg.Pool {
  const p = new pg.Pool({ connectionString: url, application_name: app, max: 2 })
  p.on('connect', () => {
    connects++
  })
  return p
}

afterAll(async () => {
  if (!pool.ended) await pool.end()
  expect(connects).toBe(0)
  expect(await backends(url, app)).toEqual([])
})

describe('an ended pool', () => {
  it('is refused when the driver is made', async () => {
    const ended = new pg.Pool({ connectionString: url, application_name: app })
    await ended.end()
    expect(() => pgDriver(ended)).toThrow(TypeError)
    expect(() => pgDriver(ended)).toThrow(/pgDriver\(pool\): the pool has ended/)
  })

  it('ended later: a checkout says the pool has ended', async () => {
    const later = new pg.Pool({ connectionString: url, application_name: app })
    const scope = createScope({ driver: pgDriver(later), name: 'ended-later', default: false })
    await later.end()
    await expect(scope.run(() => scopedPool(scope).query('SELECT 1'))).rejects.toThrow(
      /pgDriver: the pool has ended/,
    )
    await scope.close()
  })
})

describe('scopedPool(scope, options)', () => {
  // scope.close() ends its pool: each scope gets a pool of its own.
  const scope = () => createScope({ driver: pgDriver(fresh()), name: 'opts', default: false })
  it.each([
    ['null', null, /scopedPool\(scope, options\): expected an object, got null/],
    [
      'a misspelt key',
      { outsideScop: 'pool' },
      /scopedPool\(scope, \{ outsideScop \}\): unknown option/,
    ],
    [
      'a pool that is a string',
      { outsideScope: 'pool', pool: 'postgres://x' },
      /\{ pool \}\): expected a pg\.Pool/,
    ],
  ])('refuses %s', async (_label, options, message) => {
    const s = scope()
    expect(() => scopedPool(s, options as never)).toThrow(TypeError)
    expect(() => scopedPool(s, options as never)).toThrow(message)
    await s.close()
  })
})

describe('scopedPool.query() without SQL', () => {
  it.each([
    ['undefined', undefined],
    ['a number', 42],
    ['an object without text', {}],
  ])('%s: a TypeError naming query(text), and no checkout', async (_label, text) => {
    const own = fresh()
    const s = createScope({ driver: pgDriver(own), name: 'no-sql', default: false })
    const db = scopedPool(s)
    await expect(s.run(() => db.query(text as never))).rejects.toThrow(
      /scopedPool\.query\(text\): expected SQL text/,
    )
    expect(s.stats().totals.acquired).toBe(0)
    expect(own.totalCount).toBe(0)
    await s.close()
  })
})
