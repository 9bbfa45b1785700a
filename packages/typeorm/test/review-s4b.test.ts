/**
 * Session 4 review, part 2: probes of @scoped/typeorm against its README — a
 * currentManager() kept past its request while the connection serves another
 * session, TypeORM's own em.transaction() rolled back with the unit, call
 * order and release: 'idle' through scopedManager, a transaction callback that
 * throws synchronously, and a statement error caught inside a savepoint.
 */
import { createScope } from '@scoped/core'
import { currentManager, scopedManager, typeormDriver } from '@scoped/typeorm'
import type pg from 'pg'
import { DataSource, type EntityManager } from 'typeorm'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import {
  committedRows,
  expectNoIdleInTransaction,
  gate,
  uniqueAppName,
  waitFor,
} from '../../../test/foundation/support.ts'
import { NOTES_DDL } from '../../../test/orm/suite.ts'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import { NoteSchema } from './note.ts'

let url: string
let app: string
let dataSource: DataSource
let pool: pg.Pool
let scope: ReturnType<typeof createScope<import('typeorm').QueryRunner>>
let db: ReturnType<typeof scopedManager>

beforeAll(async () => {
  url = await testDatabase('typeorm_review_s4b')
  await independentQuery(url, NOTES_DDL)
  app = uniqueAppName('typeorm-s4b')
  // One connection: a kept manager that ran would run on the next session's connection.
  dataSource = await new DataSource({
    type: 'postgres',
    url,
    entities: [NoteSchema],
    poolSize: 1,
    applicationName: app,
  }).initialize()
  pool = (dataSource.driver as unknown as { master: pg.Pool }).master
  scope = createScope({ driver: typeormDriver(dataSource), default: false, name: 'typeorm-s4b' })
  db = scopedManager(scope)
})

beforeEach(async () => {
  await independentQuery(url, 'TRUNCATE notes')
})

afterAll(async () => {
  await scope.close()
})

const values = async () =>
  (await committedRows<{ v: string }>(url, 'SELECT v FROM notes ORDER BY id')).map((r) => r.v)

const settled = async () => {
  expect(pool.totalCount).toBe(pool.idleCount)
  expect(pool.waitingCount).toBe(0)
  expect(scope.stats()).toMatchObject({ open: 0, holding: 0, waiting: 0 })
  await expectNoIdleInTransaction(url, app)
}

describe('a currentManager() kept past its request', () => {
  it('rejects while the next session holds the same connection, and writes nothing there', async () => {
    let kept: EntityManager | undefined
    await scope.run(async () => {
      kept = await currentManager(scope)
      await kept.insert(NoteSchema, { v: 'in-time' })
    })
    const holding = gate()
    const inside = gate()
    const next = scope.run(async () => {
      await db.insert(NoteSchema, { v: 'next-session' })
      inside.open()
      await holding.promise
    })
    await inside.promise
    // The next session commits: a kept statement that ran in its transaction would be committed too.
    await expect(kept!.insert(NoteSchema, { v: 'kept-insert' })).rejects.toThrow(/released/)
    await expect(kept!.query(`INSERT INTO notes (v) VALUES ('kept-query')`)).rejects.toThrow(
      /released/,
    )
    await expect(
      kept!.transaction(async (em) => {
        await em.insert(NoteSchema, { v: 'kept-transaction' })
      }),
    ).rejects.toThrow(/released/)
    holding.open()
    await next
    expect(await values()).toEqual(['in-time', 'next-session'])
    await settled()
  })
})

describe("TypeORM's own em.transaction() in the unit of work", () => {
  it('after the first statement, joins it as a savepoint, two levels deep: a later throw of the scope rolls everything back', async () => {
    await expect(
      scope.run(async () => {
        // The unit of work begins here (before it, transaction(fn) is the outermost, README).
        await db.insert(NoteSchema, { v: 'first' })
        await db.transaction(async (outer) => {
          await outer.insert(NoteSchema, { v: 'scoped-savepoint' })
          await outer.transaction(async (inner) => {
            await inner.insert(NoteSchema, { v: 'typeorm-savepoint' })
          })
        })
        expect(await values()).toEqual([])
        throw new Error('planned')
      }),
    ).rejects.toThrow('planned')
    expect(await values()).toEqual([])
    await settled()
  })
})

describe('scopedManager', () => {
  it('transaction(fn) whose fn throws synchronously rejects; only its savepoint is undone', async () => {
    await scope.run(async () => {
      await db.insert(NoteSchema, { v: 'outer' })
      let p: Promise<unknown> | undefined
      expect(() => {
        p = db.transaction((() => {
          throw new Error('sync throw')
        }) as never)
      }).not.toThrow()
      await expect(p).rejects.toThrow('sync throw')
      await db.insert(NoteSchema, { v: 'after' })
    })
    expect(await values()).toEqual(['outer', 'after'])
    await settled()
  })

  it("release: 'idle': concurrent calls finish in call order on one backend; it goes back between bursts", async () => {
    await scope.run(
      async () => {
        const done: number[] = []
        const rows = await Promise.all([
          db.query('SELECT pg_sleep(0.05), pg_backend_pid() AS pid').then((r) => {
            done.push(1)
            return r
          }),
          db.query('SELECT pg_backend_pid() AS pid').then((r) => {
            done.push(2)
            return r
          }),
        ])
        expect(done).toEqual([1, 2])
        expect(rows[0][0].pid).toBe(rows[1][0].pid)
        await waitFor('the idle release', () => scope.stats().holding === 0)
        expect(pool.idleCount).toBe(pool.totalCount)
        await expect(
          db.transaction(async (em) => {
            await em.insert(NoteSchema, { v: 'rolled-back' })
            expect(scope.stats().holding).toBe(1)
            throw new Error('undo')
          }),
        ).rejects.toThrow('undo')
        await db.insert(NoteSchema, { v: 'autocommitted' })
      },
      { transaction: 'none', release: 'idle' },
    )
    expect(await values()).toEqual(['autocommitted'])
    await settled()
  })

  it('a statement error caught inside transaction(fn): the savepoint is rolled back (the caller is told why), the outer unit commits, the connection goes back clean', async () => {
    // The savepoint cannot be released (25P02): the core rolls back to it and says so (see
    // packages/drizzle/test/review-s4b.test.ts), and the unit around it goes on.
    let nested: unknown
    await scope.run(async () => {
      await db.insert(NoteSchema, { v: 'outer' })
      await db
        .transaction(async (em) => {
          await em.insert(NoteSchema, { v: 'inner' })
          await em.query('SELECT 1/0').catch(() => {})
        })
        .catch((e: unknown) => {
          nested = e
        })
    })
    expect(nested).toMatchObject({ name: 'TransactionStateError' })
    expect((nested as Error).message).toMatch(
      /rolled back, not released: a statement inside it failed and fn caught the error/,
    )
    expect(await values()).toEqual(['outer'])
    await settled()
    await scope.run(async () => {
      await db.transaction(async (em) => {
        await em.insert(NoteSchema, { v: 'next-savepoint' })
      })
      await db.insert(NoteSchema, { v: 'next' })
    })
    expect(await values()).toEqual(['outer', 'next-savepoint', 'next'])
    await settled()
  })
})

describe('maxHoldMs takes the connection under a running handler', () => {
  // Was a bug (fixed): maxHoldMs (or close()'s timeout) takes the connection: the core calls the driver's
  // cancel and release, and the TypeORM driver's release first awaits the cancel's round trip
  // (packages/typeorm/src/typeorm-driver.ts:122-124, `if (cancelling) await cancelling`) before it
  // marks the QueryRunner released (releasePostgresConnection, line 145). Meanwhile the manager
  // from currentManager() still has a live QueryRunner (isReleased false): a statement the handler
  // sends in that window runs on the connection the session no longer holds — in
  // transaction: 'none' it is autocommitted and stays written although the run rejects. The
  // MikroORM driver swaps in its closed driver before awaiting anything (mikro-orm-driver.ts:379-389),
  // so its EntityManager fails with SESSION_CLOSED at once (see packages/mikro-orm/test/
  // review-s4b.test.ts). Suggested fix: at the top of release(), before any await, make the runner
  // refuse statements (e.g. replace qr.query with one that rejects SessionClosedError, or mark it
  // released and let the driver end the client itself).
  it("in transaction: 'none', a statement sent right after the take is refused, not autocommitted", async () => {
    const held = createScope({
      driver: typeormDriver(dataSource),
      default: false,
      name: 'typeorm-s4b-held',
      maxHoldMs: 100,
    })
    let firstPid = 0
    let late: unknown = 'not sent'
    // The cancel the take sends is held until the late statement settled, so the window is
    // deterministic (without this it is the CancelRequest's round trip, and the statement
    // sometimes runs, sometimes is cut off by the release).
    let openCancel!: () => void
    const cancelGate = new Promise<void>((r) => {
      openCancel = r
    })
    const run = held.run(
      async () => {
        const em = await currentManager(held)
        const client = (em.queryRunner as unknown as { databaseConnection: any }).databaseConnection
        const Real = client.connection.constructor
        class GatedConnection extends Real {
          connect(...args: unknown[]) {
            void cancelGate.then(() => super.connect(...args))
          }
        }
        Object.defineProperty(client.connection, 'constructor', {
          value: GatedConnection,
          configurable: true,
        })
        ;[{ pid: firstPid }] = await em.query('SELECT pg_backend_pid() AS pid')
        while (held.stats().holding > 0) await new Promise((res) => setImmediate(res))
        late = await em.insert(NoteSchema, { v: 'after-taken' }).then(
          () => 'ran',
          (e: Error) => e,
        )
        openCancel()
      },
      { transaction: 'none' },
    )
    await run.catch(() => {})
    openCancel()
    expect(held.stats().totals.destroyed).toBe(1)
    // The pool recovers with a fresh backend.
    await scope.run(async () => {
      const [{ pid }] = await db.query('SELECT pg_backend_pid() AS pid')
      expect(pid).not.toBe(firstPid)
    })
    await settled()
    // What fails today: the late insert ran ('ran') and its row is committed.
    expect(late).toBeInstanceOf(Error)
    expect(await values()).toEqual([])
  })
})
