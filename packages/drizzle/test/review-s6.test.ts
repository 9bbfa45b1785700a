/**
 * Session 6 review: probes of @scoped/drizzle's README sentences no earlier
 * test pinned (BEGIN's options as the scope's first statement, the options a
 * savepoint refuses, deferrable / setTransaction, a rolled-back outermost
 * transaction followed by a new unit), and what a Drizzle user expects in a
 * request: one module-level db in two requests at once, db.execute beside
 * scopedPool, a module-level prepared query in two sessions, db.transaction
 * outside a scope, a query error's cause.
 */
import { createScope, NoActiveScopeError, TransactionStateError } from '@scoped/core'
import { scopedDrizzle } from '@scoped/drizzle'
import { pgDriver, scopedPool } from '@scoped/pg'
import { DrizzleQueryError, eq, sql } from 'drizzle-orm'
import pg from 'pg'
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import {
  committedRows,
  expectNoIdleInTransaction,
  expectPoolSettled,
  gate,
  uniqueAppName,
} from '../../../test/foundation/support.ts'
import { NOTES_DDL } from '../../../test/orm/suite.ts'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import * as schema from './schema.ts'

const { notes } = schema
let url: string
let app: string
let pool: pg.Pool
let scope: ReturnType<typeof createScope<pg.PoolClient>>
let db: ReturnType<typeof scopedDrizzle<typeof schema>>

beforeAll(async () => {
  url = await testDatabase('drizzle_review_s6')
  await independentQuery(url, NOTES_DDL)
  app = uniqueAppName('drizzle-s6')
  pool = new pg.Pool({ connectionString: url, max: 2, application_name: app })
  scope = createScope({ driver: pgDriver(pool), default: false, name: 'drizzle-s6' })
  db = scopedDrizzle(scope, { schema })
})

beforeEach(async () => {
  await independentQuery(url, 'TRUNCATE notes')
})

afterEach(async () => {
  expectPoolSettled(pool)
  expect(scope.stats()).toMatchObject({ open: 0, holding: 0, waiting: 0 })
  await expectNoIdleInTransaction(url, app)
})

afterAll(async () => {
  await scope.close()
})

const values = async () =>
  (await committedRows<{ v: string }>(url, 'SELECT v FROM notes ORDER BY id')).map((r) => r.v)

const txSettings = sql`SELECT current_setting('transaction_isolation') AS level,
  current_setting('transaction_read_only') AS ro, txid_current()::text AS txid, pg_backend_pid() AS pid`

describe("db.transaction(fn, config) in 'auto' (README: config becomes BEGIN's options)", () => {
  it("as the scope's first statement: a real BEGIN with Drizzle's isolationLevel and accessMode", async () => {
    await scope.run(async () => {
      await db.transaction(
        async (tx) => {
          const { rows } = await tx.execute(txSettings)
          expect(rows[0]).toMatchObject({ level: 'serializable', ro: 'on' })
        },
        { isolationLevel: 'serializable', accessMode: 'read only' },
      )
      // The next statement is a new unit of work, with the default options.
      const { rows } = await db.execute(txSettings)
      expect(rows[0]).toMatchObject({ level: 'read committed', ro: 'off' })
    })
  })

  it("'read uncommitted' is PostgreSQL's read committed", async () => {
    await scope.run(async () => {
      await db.transaction(
        async (tx) => {
          const { rows } = await tx.execute(txSettings)
          expect(rows[0]).toMatchObject({ level: 'read committed' })
        },
        { isolationLevel: 'read uncommitted' },
      )
    })
  })

  it('after the unit ran a statement, a savepoint refuses isolationLevel / accessMode with TransactionStateError before fn runs; the unit still commits', async () => {
    let ran = false
    await scope.run(async () => {
      await db.insert(notes).values({ v: 'before' })
      const error = await db
        .transaction(
          async () => {
            ran = true
          },
          { isolationLevel: 'serializable' },
        )
        .catch((e: unknown) => e)
      expect(error).toBeInstanceOf(TransactionStateError)
      expect((error as Error).message).toMatch(
        /is nested in an open transaction, so it is a savepoint and cannot set isolation/,
      )
      await expect(db.transaction(async () => {}, { accessMode: 'read only' })).rejects.toThrow(
        /cannot set readOnly/,
      )
      await db.insert(notes).values({ v: 'after' })
    })
    expect(ran).toBe(false)
    expect(await values()).toEqual(['before', 'after'])
  })

  it("deferrable and tx.setTransaction() throw a TypeError (README); the unit's work is untouched", async () => {
    await scope.run(async () => {
      await db.insert(notes).values({ v: 'kept' })
      await expect(db.transaction(async () => {}, { deferrable: true })).rejects.toThrow(TypeError)
      await expect(
        db.transaction(async (tx) => {
          await tx.insert(notes).values({ v: 'undone' })
          await tx.setTransaction({ isolationLevel: 'serializable' })
        }),
      ).rejects.toThrow(/tx.setTransaction\(\) is not supported/)
    })
    expect(await values()).toEqual(['kept'])
  })
})

describe("the scope's first db.transaction() rolled back, then more work (README: the next statement begins a new unit of work)", () => {
  it('a throw caught by the handler: nothing of the transaction commits, the later insert commits in its own unit, one backend', async () => {
    const pids: number[] = []
    await scope.run(async () => {
      await expect(
        db.transaction(async (tx) => {
          await tx.insert(notes).values({ v: 'undone' })
          pids.push(
            (await tx.execute<{ pid: number }>(sql`SELECT pg_backend_pid() AS pid`)).rows[0]!.pid,
          )
          throw new Error('handler-visible')
        }),
      ).rejects.toThrow('handler-visible')
      await db.insert(notes).values({ v: 'after' })
      pids.push(
        (await db.execute<{ pid: number }>(sql`SELECT pg_backend_pid() AS pid`)).rows[0]!.pid,
      )
    })
    expect(await values()).toEqual(['after'])
    expect(new Set(pids).size).toBe(1)
  })

  it('the later unit rolls back on a handler throw; the committed outermost transaction stays', async () => {
    await expect(
      scope.run(async () => {
        await db.transaction(async (tx) => {
          await tx.insert(notes).values({ v: 'committed-by-tx' })
        })
        await db.insert(notes).values({ v: 'rolled-back' })
        throw new Error('late')
      }),
    ).rejects.toThrow('late')
    expect(await values()).toEqual(['committed-by-tx'])
  })
})

describe('one module-level db in two requests at once', () => {
  it('each request runs on its own backend and transaction; one throwing does not undo the other', async () => {
    const bothIn = gate()
    let entered = 0
    const seen: Record<string, { pid: number; txid: string }> = {}
    const request = (name: string, fail: boolean) =>
      scope.run(async () => {
        await db.insert(notes).values({ v: name })
        const { rows } = await db.execute<{ pid: number; txid: string }>(txSettings)
        seen[name] = rows[0]!
        if (++entered === 2) bothIn.open()
        await bothIn.promise
        // Each request sees only its own uncommitted row.
        const mine = await db.select({ v: notes.v }).from(notes)
        expect(mine.map((r) => r.v)).toEqual([name])
        if (fail) throw new Error(`${name} fails`)
      })
    const [a, b] = await Promise.allSettled([request('a', false), request('b', true)])
    expect(a.status).toBe('fulfilled')
    expect(b.status).toBe('rejected')
    expect(seen.a!.pid).not.toBe(seen.b!.pid)
    expect(seen.a!.txid).not.toBe(seen.b!.txid)
    expect(await values()).toEqual(['a'])
  })
})

describe('db.execute() beside a scopedPool query in one request', () => {
  it('same backend and same transaction, in call order; a handler throw undoes both', async () => {
    const pooled = scopedPool(scope)
    let same: { pid: number; txid: string }[] = []
    await expect(
      scope.run(async () => {
        await db.insert(notes).values({ v: 'drizzle' })
        await pooled.query("INSERT INTO notes (v) VALUES ('pool')")
        const a = await db.execute<{ pid: number; txid: string }>(txSettings)
        const b = await pooled.query<{ pid: number; txid: string }>(
          'SELECT pg_backend_pid() AS pid, txid_current()::text AS txid',
        )
        same = [a.rows[0]!, b.rows[0]!]
        // Each sees the other's uncommitted write.
        const rows = await db.select({ v: notes.v }).from(notes).orderBy(notes.id)
        expect(rows.map((r) => r.v)).toEqual(['drizzle', 'pool'])
        throw new Error('undo both')
      }),
    ).rejects.toThrow('undo both')
    expect(same[0]!.pid).toBe(same[1]!.pid)
    expect(same[0]!.txid).toBe(same[1]!.txid)
    expect(await values()).toEqual([])
  })
})

describe('a prepared query made once at module scope', () => {
  it('runs in two sessions on two connections, each in its own unit of work', async () => {
    const byV = db
      .select({ v: notes.v })
      .from(notes)
      .where(eq(notes.v, sql.placeholder('v')))
      .prepare('notes_by_v_s6')
    const bothIn = gate()
    const bothRead = gate()
    let entered = 0
    let read = 0
    const request = (name: string) =>
      scope.run(async () => {
        await db.insert(notes).values({ v: name })
        const { rows } = await db.execute<{ pid: number }>(sql`SELECT pg_backend_pid() AS pid`)
        if (++entered === 2) bothIn.open()
        await bothIn.promise
        const mine = await byV.execute({ v: name })
        const theirs = await byV.execute({ v: name === 'a' ? 'b' : 'a' })
        // Neither commits before both read (read committed would show the other's row).
        if (++read === 2) bothRead.open()
        await bothRead.promise
        return { pid: rows[0]!.pid, mine: mine.map((r) => r.v), theirs: theirs.length }
      })
    const [a, b] = await Promise.all([request('a'), request('b')])
    expect(a.pid).not.toBe(b.pid)
    expect(a).toMatchObject({ mine: ['a'], theirs: 0 })
    expect(b).toMatchObject({ mine: ['b'], theirs: 0 })
    // Used again in later sessions (the statement is already prepared on the connections).
    const again = await scope.run(() => byV.execute({ v: 'a' }))
    expect(again).toEqual([{ v: 'a' }])
  })
})

describe('outside a scope', () => {
  it('db.transaction() rejects with NoActiveScopeError (a rejection, not a synchronous throw); fn never runs', async () => {
    let ran = false
    let result: Promise<unknown> | undefined
    expect(() => {
      result = db.transaction(async () => {
        ran = true
      })
    }).not.toThrow()
    await expect(result).rejects.toBeInstanceOf(NoActiveScopeError)
    expect(ran).toBe(false)
  })

  it('db.query.notes.findMany() rejects with NoActiveScopeError as the cause', async () => {
    const error = await db.query.notes.findMany().catch((e: unknown) => e)
    expect((error as { cause?: unknown }).cause ?? error).toBeInstanceOf(NoActiveScopeError)
  })
})

describe('a query error inside a request', () => {
  it("is Drizzle's DrizzleQueryError whose cause is pg's error with the SQLSTATE; the unit rolls back", async () => {
    let error: unknown
    await expect(
      scope.run(async () => {
        await db.insert(notes).values({ v: 'undone' })
        error = await db.execute(sql`SELECT 1 / 0`).catch((e: unknown) => e)
        throw error
      }),
    ).rejects.toBeInstanceOf(DrizzleQueryError)
    expect(error).toBeInstanceOf(DrizzleQueryError)
    expect((error as { cause?: { code?: string } }).cause?.code).toBe('22012')
    expect(await values()).toEqual([])
  })
})
