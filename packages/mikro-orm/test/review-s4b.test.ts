/**
 * Session 4 review, part 2: probes of @scoped/mikro-orm against its README —
 * MikroORM's own em.transactional() inside a unit of work, a caught statement
 * error, an EntityManager kept past a 'none' session while the connection
 * serves another, a failing flush at COMMIT, and errors that must come back as
 * rejections.
 */

import type { EntityManager, MikroORM } from '@mikro-orm/postgresql'
import { createScope } from '@scoped/core'
import { currentEntityManager, mikroOrmDriver } from '@scoped/mikro-orm'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import {
  committedRows,
  expectNoIdleInTransaction,
  gate,
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
  url = await testDatabase('mikro_orm_review_s4b')
  await independentQuery(url, NOTES_DDL)
  await independentQuery(url, 'CREATE UNIQUE INDEX notes_v_unique ON notes (v)')
  app = uniqueAppName('mikro-s4b')
  // One connection: every session reuses the same backend, so a kept EntityManager
  // would run on the connection the next session holds.
  orm = await initOrm(url, 1, app)
  scope = createScope({ driver: mikroOrmDriver(orm), default: false, name: 'mikro-s4b' })
})

beforeEach(async () => {
  await independentQuery(url, 'TRUNCATE notes')
})

afterAll(async () => {
  await scope.close()
})

const values = async () =>
  (await committedRows<{ v: string }>(url, 'SELECT v FROM notes ORDER BY id')).map((r) => r.v)

const expectPoolIdle = async () => {
  const p = poolFigures(orm)
  expect(p.total).toBe(p.idle)
  expect(p.waiting).toBe(0)
  expect(scope.stats()).toMatchObject({ open: 0, holding: 0, waiting: 0 })
  await expectNoIdleInTransaction(url, app)
}

describe("MikroORM's em.transactional() inside the unit of work ('auto')", () => {
  it('joins the unit as a savepoint: a later throw of the scope rolls back what it flushed', async () => {
    await expect(
      scope.run(async () => {
        const em = await currentEntityManager(scope)
        await em.transactional(async (inner) => {
          inner.persist(inner.create(NoteSchema, { v: 'in-transactional' }))
        })
        // The row is flushed (inside the unit's transaction), not committed.
        expect(await values()).toEqual([])
        throw new Error('planned')
      }),
    ).rejects.toThrow('planned')
    expect(await values()).toEqual([])
    await expectPoolIdle()
  })

  it('an inner throw undoes only its own writes; the outer unit commits the rest', async () => {
    await scope.run(async () => {
      const em = await currentEntityManager(scope)
      em.persist(em.create(NoteSchema, { v: 'outer' }))
      await expect(
        em.transactional(async (inner) => {
          inner.persist(inner.create(NoteSchema, { v: 'inner-dropped' }))
          await inner.flush()
          throw new Error('inner planned')
        }),
      ).rejects.toThrow('inner planned')
      em.persist(em.create(NoteSchema, { v: 'after' }))
    })
    expect(await values()).toEqual(['outer', 'after'])
    await expectPoolIdle()
  })
})

describe('a statement that fails', () => {
  // Was a bug (fixed): a statement whose error the handler caught aborts the transaction; PostgreSQL then
  // answers COMMIT with the command tag ROLLBACK and no error. The driver's commit sends COMMIT
  // and ignores the tag (packages/mikro-orm/src/mikro-orm-driver.ts:302-309, `end()`), so the run
  // resolves as if the unit committed, and nothing was written. @scoped/pg (driver.ts:311),
  // @scoped/kysely (kysely-driver.ts:316) and @scoped/typeorm (typeorm-driver.ts commit) all
  // reject with TransactionStateError here.
  it('caught by the handler: the run rejects (TransactionStateError), nothing is committed', async () => {
    const run = scope.run(async () => {
      const em = await currentEntityManager(scope)
      await em.execute(`INSERT INTO notes (v) VALUES ('before-error')`)
      await expect(em.execute('SELECT 1/0')).rejects.toThrow(/division by zero/)
    })
    await expect(run).rejects.toMatchObject({ name: 'TransactionStateError' })
    expect(await values()).toEqual([])
    await expectPoolIdle()
  })

  it("the real error reaches the user (not 'current transaction is aborted') when the first statement fails", async () => {
    // The first statement goes out pipelined with the session's BEGIN (README: 'BEGIN; <stmt>').
    const run = scope.run(async () => {
      const em = await currentEntityManager(scope)
      await em.execute('SELECT 1/0')
    })
    await expect(run).rejects.toThrow(/division by zero/)
    await expectPoolIdle()
    // The connection is clean for the next session.
    await scope.run(async () => {
      const em = await currentEntityManager(scope)
      await em.execute(`INSERT INTO notes (v) VALUES ('next')`)
    })
    expect(await values()).toEqual(['next'])
  })

  it('a flush that fails at COMMIT (unique violation) rejects the run with that error; nothing is committed', async () => {
    await independentQuery(url, `INSERT INTO notes (v) VALUES ('taken')`)
    const run = scope.run(async () => {
      const em = await currentEntityManager(scope)
      await em.execute(`INSERT INTO notes (v) VALUES ('flushed-first')`)
      em.persist(em.create(NoteSchema, { v: 'taken' }))
    })
    await expect(run).rejects.toThrow(/notes_v_unique|duplicate key/)
    expect(await values()).toEqual(['taken'])
    await expectPoolIdle()
  })
})

describe("an EntityManager kept past a 'none' session", () => {
  it('fails with SESSION_CLOSED while the next session holds the same connection, and writes nothing there', async () => {
    let kept: EntityManager | undefined
    await scope.run(
      async () => {
        kept = await currentEntityManager(scope)
        await kept.execute('SELECT 1')
      },
      { transaction: 'none' },
    )
    const holding = gate()
    const inside = gate()
    const next = scope.run(
      async () => {
        const em = await currentEntityManager(scope)
        await em.execute(`INSERT INTO notes (v) VALUES ('next-session')`)
        inside.open()
        await holding.promise
        throw new Error('roll the next session back')
      },
      { transaction: 'auto' },
    )
    await inside.promise
    const closed = { code: 'SESSION_CLOSED' }
    // The pool has one connection, held by the next session: a statement that ran would land in
    // its transaction (and vanish with its rollback) or block; neither may happen.
    await expect(kept!.execute(`INSERT INTO notes (v) VALUES ('kept-em')`)).rejects.toMatchObject(
      closed,
    )
    await expect(
      kept!.transactional(async (inner) => {
        inner.persist(inner.create(NoteSchema, { v: 'kept-transactional' }))
      }),
    ).rejects.toMatchObject(closed)
    holding.open()
    await expect(next).rejects.toThrow('roll the next session back')
    expect(await values()).toEqual([])
    await expectPoolIdle()
  })
})

describe('errors come back as rejections', () => {
  it('currentEntityManager() outside a scope rejects (NoActiveScopeError), it does not throw', async () => {
    let p: Promise<unknown> | undefined
    expect(() => {
      p = currentEntityManager(scope)
    }).not.toThrow()
    await expect(p).rejects.toMatchObject({ name: 'NoActiveScopeError' })
  })
})

describe("release: 'idle'", () => {
  it('the EntityManager keeps its connection to the end of the session (README); statements go in call order on it', async () => {
    await scope.run(
      async () => {
        const em = await currentEntityManager(scope)
        const order: number[] = []
        const pids = await Promise.all(
          [1, 2, 3].map(async (i) => {
            const [r] = await em.execute(`SELECT pg_backend_pid() AS pid, ${i} AS i`)
            order.push(r!.i)
            return r!.pid
          }),
        )
        expect(order).toEqual([1, 2, 3])
        expect(new Set(pids).size).toBe(1)
        em.persist(em.create(NoteSchema, { v: 'idle-unit' }))
      },
      { transaction: 'none', release: 'idle' },
    )
    // 'none' flushes nothing at the end (README): the persisted entity is dropped.
    expect(await values()).toEqual([])
    await expectPoolIdle()
  })
})

describe('maxHoldMs takes the connection under a running handler', () => {
  it('the EntityManager then fails with SESSION_CLOSED, the backend is closed (not pooled), the next session works', async () => {
    const held = createScope({
      driver: mikroOrmDriver(orm),
      default: false,
      name: 'mikro-s4b-held',
      maxHoldMs: 100,
    })
    let firstPid = 0
    const run = held.run(async () => {
      const em = await currentEntityManager(held)
      const [r] = await em.execute('SELECT pg_backend_pid() AS pid')
      firstPid = r!.pid
      em.persist(em.create(NoteSchema, { v: 'taken' }))
      while (held.stats().holding > 0) await new Promise((res) => setImmediate(res))
      await em.execute(`INSERT INTO notes (v) VALUES ('after-taken')`)
    })
    await expect(run).rejects.toMatchObject({ code: 'SESSION_CLOSED' })
    expect(held.stats().totals.destroyed).toBe(1)
    expect(await values()).toEqual([])
    await scope.run(async () => {
      const em = await currentEntityManager(scope)
      const [r] = await em.execute('SELECT pg_backend_pid() AS pid')
      expect(r!.pid).not.toBe(firstPid)
      em.persist(em.create(NoteSchema, { v: 'next' }))
    })
    expect(await values()).toEqual(['next'])
    await expectPoolIdle()
  })
})
