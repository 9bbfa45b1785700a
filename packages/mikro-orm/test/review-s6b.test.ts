/**
 * Session 6 review, round b: probes of the change to what the outermost
 * ROLLBACK forgets (first `em.clear()`, then only the entities the transaction
 * loaded, after these probes), against a real PostgreSQL. What an entity loaded
 * before a rolled-back `transaction(fn)` becomes, and what a retried
 * `transaction(fn, { retry })` does with one.
 */
import type { EntityManager, MikroORM } from '@mikro-orm/postgresql'
import { createScope } from '@scoped/core'
import { currentEntityManager, mikroOrmDriver } from '@scoped/mikro-orm'
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import {
  committedRows,
  expectNoIdleInTransaction,
  uniqueAppName,
} from '../../../test/foundation/support.ts'
import { NOTES_DDL } from '../../../test/orm/suite.ts'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import { NoteSchema } from './note.ts'
import { initOrm, poolFigures } from './orm.ts'

let url: string
let app: string
let orm: MikroORM
let scope: ReturnType<typeof createScope<EntityManager>>

beforeAll(async () => {
  url = await testDatabase('mikro_orm_review_s6b')
  await independentQuery(url, NOTES_DDL)
  app = uniqueAppName('mikro-s6b')
  orm = await initOrm(url, 2, app)
  scope = createScope({ driver: mikroOrmDriver(orm), default: false, name: 'mikro-s6b' })
})

beforeEach(async () => {
  await independentQuery(url, 'TRUNCATE notes RESTART IDENTITY')
})

afterEach(async () => {
  const p = poolFigures(orm)
  expect(p.total).toBe(p.idle)
  expect(p.waiting).toBe(0)
  expect(scope.stats()).toMatchObject({ open: 0, holding: 0, waiting: 0 })
  await expectNoIdleInTransaction(url, app)
})

afterAll(async () => {
  await scope.close()
})

const values = async () =>
  (await committedRows<{ v: string }>(url, 'SELECT v FROM notes ORDER BY id')).map((r) => r.v)

describe("'none': an entity loaded before a transaction(fn) that rolls back", () => {
  // README (ROLLBACK, since session 6's second change): entities managed before the
  // transaction stay managed; what it loaded or persisted is forgotten. A later change to one
  // loaded before is written by em.flush(); what was persisted inside is not.
  it('a change to it after the rollback is written by em.flush(); what was persisted inside is not', async () => {
    await independentQuery(url, "INSERT INTO notes (v) VALUES ('0')")
    let flushError: unknown
    await scope.run(
      async () => {
        const em = await currentEntityManager(scope)
        const note = await em.findOneOrFail(NoteSchema, 1)
        await expect(
          scope.getSession().transaction(async () => {
            em.persist(em.create(NoteSchema, { v: 'inner' }))
            throw new Error('inner fails')
          }),
        ).rejects.toThrow('inner fails')
        note.v = 'after'
        try {
          await em.flush()
        } catch (e) {
          flushError = e
        }
      },
      { transaction: 'none' },
    )
    expect(flushError).toBeUndefined()
    expect(await values()).toEqual(['after'])
  })

  // README: "transaction(fn, { retry }) re-runs on 40001/40P01" and (ROLLBACK) "a retried
  // transaction(fn, { retry }) reads the rows again". An entity loaded before transaction(fn)
  // (a read in autocommit, then the write in a transaction: the usual 'none' shape) and changed
  // inside fn. Attempt 1's flush fails with 40001 (a concurrent UPDATE after its snapshot);
  // its ROLLBACK now clears the fork, so in attempt 2 the entity is detached: the change is not
  // flushed, the COMMIT commits nothing, and transaction(fn) resolves as if the write was saved.
  // The caller never saw a rollback to "load them again" after: the retry is inside the call.
  // Expected: the second attempt's write committed ('attempt-2'), or transaction(fn) rejects.
  // What happened: it resolved, 2 attempts, and the row was still the concurrent '100'. Fixed:
  // the ROLLBACK forgets only what the transaction loaded; this entity stays managed.
  // (Before 57105f0 the ROLLBACK only cleared the actions queue: the entity stayed managed,
  // attempt 1's failed flush left its original data at '0', and attempt 2's flush wrote it.)
  it('transaction(fn, { retry }) changing an entity loaded before it: the retried attempt’s change is committed, or the call rejects', async () => {
    await independentQuery(url, "INSERT INTO notes (v) VALUES ('0')")
    let attempts = 0
    let outcome = 'resolved'
    await scope.run(
      async () => {
        const em = await currentEntityManager(scope)
        const note = await em.findOneOrFail(NoteSchema, 1)
        try {
          await scope.getSession().transaction(
            async () => {
              attempts++
              await em.execute('SELECT 1') // the snapshot starts here
              if (attempts === 1) await independentQuery(url, "UPDATE notes SET v = '100'")
              note.v = `attempt-${attempts}`
              await em.flush()
            },
            { isolation: 'repeatable read', retry: { attempts: 3, backoffMs: 1 } },
          )
        } catch (e) {
          outcome = `rejected: ${(e as Error).message}`
        }
      },
      { transaction: 'none' },
    )
    expect(attempts).toBe(2)
    const committed = await values()
    expect(outcome === 'resolved' ? committed : outcome).toEqual(
      outcome === 'resolved' ? ['attempt-2'] : outcome,
    )
  })
})

describe("'auto': a rollback at the scope's end, then the release's own em.clear()", () => {
  it('a request that throws: nothing written, the fork released once, its entities detached, nothing left open', async () => {
    await independentQuery(url, "INSERT INTO notes (v) VALUES ('0')")
    let em: EntityManager | undefined
    let note: { v: string } | undefined
    await expect(
      scope.run(async () => {
        em = await currentEntityManager(scope)
        note = await em.findOneOrFail(NoteSchema, 1)
        note.v = 'changed'
        em.persist(em.create(NoteSchema, { v: 'new' }))
        await em.flush()
        throw new Error('request fails')
      }),
    ).rejects.toThrow('request fails')
    expect(await values()).toEqual(['0'])
    expect(em!.getUnitOfWork().getIdentityMap().values()).toEqual([])
  })

  it('a rolled-back savepoint keeps the fork (only the outermost ROLLBACK clears it); the outer unit commits', async () => {
    await independentQuery(url, "INSERT INTO notes (v) VALUES ('0')")
    await scope.run(async () => {
      const em = await currentEntityManager(scope)
      const note = await em.findOneOrFail(NoteSchema, 1)
      await expect(
        scope.getSession().transaction(async () => {
          em.persist(em.create(NoteSchema, { v: 'inner' }))
          throw new Error('inner fails')
        }),
      ).rejects.toThrow('inner fails')
      note.v = 'after-savepoint'
    })
    expect(await values()).toEqual(['after-savepoint'])
  })
})
