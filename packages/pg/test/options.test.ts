/**
 * pgDriver and scopedPool reject what they cannot use with a TypeError naming
 * the argument or option, before a connection is made.
 */
import { createScope } from '@scoped/core'
import { pgDriver, scopedPool } from '@scoped/pg'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { backends, testDatabase } from '../../../test/support/db.ts'

let url: string
let pool: pg.Pool
let connects = 0
const app = `pg_options_${process.pid}`

beforeAll(async () => {
  url = await testDatabase('pg_options')
  pool = new pg.Pool({ connectionString: url, application_name: app, max: 2 })
  pool.on('connect', () => {
    connects++
  })
})

afterAll(async () => {
  await pool.end()
  expect(connects).toBe(0)
  expect(await backends(url, app)).toEqual([])
})

describe('pgDriver(pool, options)', () => {
  it.each([
    ['a connection string', 'postgres://localhost/db'],
    ['a pg.Client', () => new pg.Client({ connectionString: 'postgres://localhost/db' })],
    ['null', null],
    ['undefined', undefined],
    ['a plain object', { connect() {} }],
  ])('rejects %s in place of a pool', (_label, value) => {
    const pool = typeof value === 'function' ? value() : value
    expect(() => pgDriver(pool as never)).toThrow(TypeError)
    expect(() => pgDriver(pool as never)).toThrow(/pgDriver\(pool\): expected a pg\.Pool/)
  })

  it.each([
    ['statementTimeoutMs', -1],
    ['statementTimeoutMs', 1.5],
    ['statementTimeoutMs', Number.NaN],
    ['statementTimeoutMs', Number.POSITIVE_INFINITY],
    ['statementTimeoutMs', '5s'],
    ['applicationName', ''],
    ['applicationName', 42],
    ['validateIdleMs', -1],
    ['validateIdleMs', Number.NaN],
    ['validateIdleMs', Number.POSITIVE_INFINITY],
    ['onIdleError', 'log'],
    ['statementTimeout', 1000],
  ])('rejects { %s: %s }, naming it', (key, value) => {
    const call = () => pgDriver(pool, { [key]: value } as never)
    expect(call).toThrow(TypeError)
    expect(call).toThrow(`pgDriver(pool, { ${key} })`)
  })

  it('an unknown option lists the known ones', () => {
    expect(() => pgDriver(pool, { applicationname: 'x' } as never)).toThrow(
      /unknown option\. Known options: statementTimeoutMs, applicationName, validateIdleMs, onIdleError/,
    )
  })

  it('rejects non-object options', () => {
    expect(() => pgDriver(pool, 'fast' as never)).toThrow(/pgDriver\(pool, options\)/)
  })
})

describe('scopedPool(scope, options)', () => {
  it('rejects a non-scope and bad options', () => {
    const scope = createScope({ driver: pgDriver(pool), default: false })
    expect(() => scopedPool(pool as never)).toThrow(/scopedPool\(scope\): expected a Scope/)
    expect(() => scopedPool(scope, { outsideScope: 'ignore' as never })).toThrow(/outsideScope/)
    expect(() => scopedPool(scope, { outsideScope: 'pool' })).toThrow(/pass the pool too/)
  })
})
