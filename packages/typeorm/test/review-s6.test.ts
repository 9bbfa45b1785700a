/**
 * Session 6 review: probes of @scoped/typeorm's README sentences no earlier
 * test pinned (the offline calls and the refusals, non-postgres DataSources,
 * scope.close() destroying the DataSource, transaction subscribers, readOnly,
 * retry on 40001), and what a TypeORM user expects in a request: the scoped
 * manager's transaction(fn) nested two levels, a repository kept at module
 * scope in two requests at once, `db` used inside its own transaction
 * callback, `dataSource.manager` beside the unit of work, the scope's first
 * transaction(fn) followed by a throw.
 */
import { createScope, NoActiveScopeError, type Scope, TransactionStateError } from '@scoped/core'
import { currentManager, scopedManager, typeormDriver } from '@scoped/typeorm'
import type pg from 'pg'
import {
  DataSource,
  type EntitySubscriberInterface,
  QueryFailedError,
  type QueryRunner,
} from 'typeorm'
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import {
  committedRows,
  expectNoIdleInTransaction,
  gate,
  uniqueAppName,
} from '../../../test/foundation/support.ts'
import { NOTES_DDL } from '../../../test/orm/suite.ts'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import { NoteSchema } from './note.ts'

const events: string[] = []

/** TypeORM's transaction subscriber API, recording what fires. */
class TxEvents implements EntitySubscriberInterface {
  beforeTransactionStart() {
    events.push('beforeStart')
  }
  afterTransactionCommit() {
    events.push('afterCommit')
  }
  afterTransactionRollback() {
    events.push('afterRollback')
  }
}

let url: string
let app: string
let dataSource: DataSource
let pool: pg.Pool
let scope: Scope<QueryRunner>
let db: ReturnType<typeof scopedManager>

beforeAll(async () => {
  url = await testDatabase('typeorm_review_s6')
  await independentQuery(url, NOTES_DDL)
  await independentQuery(url, 'CREATE TABLE counter (id int PRIMARY KEY, n int NOT NULL)')
  app = uniqueAppName('typeorm-s6')
  dataSource = await new DataSource({
    type: 'postgres',
    url,
    entities: [NoteSchema],
    poolSize: 2,
    applicationName: app,
  }).initialize()
  // TypeORM loads subscriber classes only with the @EventSubscriber() decorator; the tests have
  // no decorator transform, so the instance goes into the list TypeORM's Broadcaster reads.
  dataSource.subscribers.push(new TxEvents())
  pool = (dataSource.driver as unknown as { master: pg.Pool }).master
  scope = createScope({ driver: typeormDriver(dataSource), default: false, name: 'typeorm-s6' })
  db = scopedManager(scope)
})

beforeEach(async () => {
  await independentQuery(url, 'TRUNCATE notes; TRUNCATE counter; INSERT INTO counter VALUES (1, 0)')
  events.length = 0
})

afterEach(async () => {
  expect(pool.totalCount).toBe(pool.idleCount)
  expect(pool.waitingCount).toBe(0)
  expect(scope.stats()).toMatchObject({ open: 0, holding: 0, waiting: 0 })
  await expectNoIdleInTransaction(url, app)
})

afterAll(async () => {
  await scope.close()
})

const values = async () =>
  (await committedRows<{ v: string }>(url, 'SELECT v FROM notes ORDER BY id')).map((r) => r.v)

describe('scopedManager: calls that never touch the database, and the refusals (README)', () => {
  it('create, merge, hasId, getId work outside any scope', () => {
    const note = db.create(NoteSchema, { v: 'x' })
    expect(db.merge(NoteSchema, note, { v: 'y' })).toEqual({ v: 'y' })
    expect(db.hasId(NoteSchema as never, { id: 3, v: 'z' })).toBe(true)
    expect(db.getId(NoteSchema, { id: 3, v: 'z' })).toBe(3)
    const repo = db.getRepository(NoteSchema)
    expect(repo.create({ v: 'r' })).toEqual({ v: 'r' })
    expect(repo.hasId({ id: 1, v: 'r' })).toBe(true)
  })

  it('queryRunner, release, getTreeRepository and a repository’s createQueryBuilder throw a TypeError naming the fix', () => {
    const any = db as unknown as Record<string, unknown>
    expect(() => any.queryRunner).toThrow(TypeError)
    expect(() => any.queryRunner).toThrow(
      /Fix: const em = await currentManager\(scope\); em.queryRunner/,
    )
    expect(() => any.release).toThrow(/release is not available on the scoped manager/)
    expect(() => any.getTreeRepository).toThrow(/em.getTreeRepository/)
    const repo = db.getRepository(NoteSchema) as unknown as Record<string, unknown>
    expect(() => repo.createQueryBuilder).toThrow(
      /getRepository\(\.\.\.\)\.createQueryBuilder is not available on the scoped manager/,
    )
  })

  it("a DataSource whose type is not 'postgres' is refused (README: others throw)", () => {
    const mysql = { createQueryRunner() {}, options: { type: 'mysql' } } as unknown as DataSource
    expect(() => typeormDriver(mysql)).toThrow(TypeError)
    expect(() => typeormDriver(mysql)).toThrow(/DataSource type 'mysql' is not supported/)
  })

  it('outside a scope, transaction(fn) and a repository call reject with NoActiveScopeError; fn never runs', async () => {
    let ran = false
    await expect(
      db.transaction(async () => {
        ran = true
      }),
    ).rejects.toBeInstanceOf(NoActiveScopeError)
    await expect(db.getRepository(NoteSchema).find()).rejects.toBeInstanceOf(NoActiveScopeError)
    expect(ran).toBe(false)
  })
})

describe('transactions (README: TypeORM’s runner API, so its subscribers fire)', () => {
  it('the unit of work fires beforeTransactionStart and afterTransactionCommit once; a throw fires afterTransactionRollback', async () => {
    await scope.run(async () => {
      await db.insert(NoteSchema, { v: 'a' })
      await db.insert(NoteSchema, { v: 'b' })
    })
    expect(events).toEqual(['beforeStart', 'afterCommit'])
    events.length = 0
    await expect(
      scope.run(async () => {
        await db.insert(NoteSchema, { v: 'c' })
        throw new Error('undo')
      }),
    ).rejects.toThrow('undo')
    expect(events).toEqual(['beforeStart', 'afterRollback'])
    expect(await values()).toEqual(['a', 'b'])
  })

  it('readOnly (README: SET TRANSACTION READ ONLY after startTransaction): a write in it fails with 25006', async () => {
    await scope.run(async () => {
      const session = scope.getSession()
      const error = await session
        .transaction(
          async () => {
            const [{ ro }] = await db.query("SELECT current_setting('transaction_read_only') AS ro")
            expect(ro).toBe('on')
            await db.insert(NoteSchema, { v: 'refused' })
          },
          { readOnly: true, isolation: 'repeatable read' },
        )
        .catch((e: unknown) => e)
      expect(error).toBeInstanceOf(QueryFailedError)
      expect((error as { driverError?: { code?: string } }).driverError?.code).toBe('25006')
      // The next statement is a new, writable unit of work.
      await db.insert(NoteSchema, { v: 'after' })
    })
    expect(await values()).toEqual(['after'])
  })

  it('transaction(fn, { retry }) re-runs on a serialization failure (40001) read from QueryFailedError.driverError', async () => {
    let attempts = 0
    await scope.run(async () => {
      await scope.getSession().transaction(
        async () => {
          attempts++
          const [{ n }] = await db.query('SELECT n FROM counter WHERE id = 1')
          if (attempts === 1) {
            // Another connection changes the row this snapshot read: the UPDATE below fails 40001.
            await independentQuery(url, 'UPDATE counter SET n = n + 100 WHERE id = 1')
          }
          await db.query('UPDATE counter SET n = $1 WHERE id = 1', [n + 1])
          await db.insert(NoteSchema, { v: `attempt-${attempts}` })
        },
        { isolation: 'repeatable read', retry: { attempts: 3, backoffMs: 1 } },
      )
    })
    expect(attempts).toBe(2)
    expect(await values()).toEqual(['attempt-2'])
    expect(await committedRows(url, 'SELECT n FROM counter')).toEqual([{ n: 101 }])
  })

  it('transaction(isolation, fn) nested in the unit (a savepoint) is refused before fn runs; the unit commits the rest', async () => {
    let ran = false
    await scope.run(async () => {
      await db.insert(NoteSchema, { v: 'kept' })
      await expect(
        db.transaction('SERIALIZABLE', async () => {
          ran = true
        }),
      ).rejects.toBeInstanceOf(TransactionStateError)
    })
    expect(ran).toBe(false)
    expect(await values()).toEqual(['kept'])
  })
})

describe('scopedManager.transaction(fn) nested two levels', () => {
  it('an inner throw caught by the middle undoes only the inner; db (not em) inside a callback writes in the same savepoint', async () => {
    await scope.run(async () => {
      await db.insert(NoteSchema, { v: 'outer' })
      await db.transaction(async (em) => {
        await em.insert(NoteSchema, { v: 'middle' })
        await expect(
          db.transaction(async (inner) => {
            await inner.insert(NoteSchema, { v: 'inner-em' })
            // The module-level db, not the callback's em: the user's "same transaction" expectation.
            await db.insert(NoteSchema, { v: 'inner-db' })
            throw new Error('inner')
          }),
        ).rejects.toThrow('inner')
        await db.insert(NoteSchema, { v: 'middle-db' })
      })
    })
    expect(await values()).toEqual(['outer', 'middle', 'middle-db'])
  })
})

describe("the scope's first scopedManager.transaction(fn) (the outermost transaction)", () => {
  it('commits when fn returns: a later throw of the handler undoes only what came after it', async () => {
    await expect(
      scope.run(async () => {
        await db.transaction(async (em) => {
          await em.insert(NoteSchema, { v: 'committed-by-transaction' })
        })
        await db.insert(NoteSchema, { v: 'rolled-back' })
        throw new Error('late')
      }),
    ).rejects.toThrow('late')
    expect(await values()).toEqual(['committed-by-transaction'])
  })
})

describe('a repository kept at module scope, in two requests at once', () => {
  it('each request on its own backend and transaction; one throwing does not undo the other', async () => {
    const notes = db.getRepository(NoteSchema)
    const bothIn = gate()
    let entered = 0
    const seen: Record<string, { pid: number; txid: string }> = {}
    const request = (name: string, fail: boolean) =>
      scope.run(async () => {
        await notes.insert({ v: name })
        const [row] = await db.query('SELECT pg_backend_pid() AS pid, txid_current()::text AS txid')
        seen[name] = row
        if (++entered === 2) bothIn.open()
        await bothIn.promise
        expect((await notes.find()).map((n) => n.v)).toEqual([name])
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

describe('one request, three ways in', () => {
  it('scopedManager.query, currentManager and session.use run on one backend in one transaction', async () => {
    const rows: { pid: number; txid: string }[] = []
    const q = 'SELECT pg_backend_pid() AS pid, txid_current()::text AS txid'
    await scope.run(async () => {
      rows.push((await db.query(q))[0])
      rows.push((await (await currentManager(scope)).query(q))[0])
      rows.push((await scope.getSession().use((qr) => qr.query(q)))[0])
    })
    expect(new Set(rows.map((r) => r.pid)).size).toBe(1)
    expect(new Set(rows.map((r) => r.txid)).size).toBe(1)
  })

  it('dataSource.manager is outside the unit of work (README): its write survives the request’s rollback', async () => {
    await expect(
      scope.run(async () => {
        await db.insert(NoteSchema, { v: 'unit' })
        await dataSource.manager.insert(NoteSchema, { v: 'outside' })
        throw new Error('undo the unit')
      }),
    ).rejects.toThrow('undo the unit')
    expect(await values()).toEqual(['outside'])
  })
})

describe('scope.close() (README: destroys the DataSource)', () => {
  it('the DataSource is no longer initialized and its pool ended', async () => {
    const ds = await new DataSource({
      type: 'postgres',
      url,
      entities: [NoteSchema],
      poolSize: 1,
      applicationName: app,
    }).initialize()
    const own = createScope({ driver: typeormDriver(ds), default: false, name: 'typeorm-s6-close' })
    await own.run(() => scopedManager(own).insert(NoteSchema, { v: 'before-close' }))
    await own.close()
    expect(ds.isInitialized).toBe(false)
    const ownPool = (ds.driver as unknown as { master?: pg.Pool }).master
    expect(ownPool === undefined || ownPool.totalCount === 0).toBe(true)
    expect(await values()).toEqual(['before-close'])
  })
})
