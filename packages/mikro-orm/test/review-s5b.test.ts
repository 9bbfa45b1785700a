/**
 * Review probes (session 5, part b) of @scoped/mikro-orm: a job aborted
 * through its signal or its timeout while a tracked MikroORM statement runs,
 * maxHoldMs under session.transaction(fn), and a unit of work whose flush
 * succeeds but whose COMMIT fails on a deferred constraint — what the caller
 * sees, what is committed, and whether the connection comes back once.
 */

import type { EntityManager, MikroORM } from '@mikro-orm/postgresql'
import { createScope, ScopeAbortedError, SessionClosedError } from '@scoped/core'
import { currentEntityManager, mikroOrmDriver } from '@scoped/mikro-orm'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import {
  committedRows,
  expectNoIdleInTransaction,
  uniqueAppName,
  waitFor,
} from '../../../test/foundation/support.ts'
import { NOTES_DDL } from '../../../test/orm/suite.ts'
import { backends, independentQuery, testDatabase } from '../../../test/support/db.ts'
import { NoteSchema } from './note.ts'
import { initOrm, poolFigures } from './orm.ts'

let url: string
let app: string
let orm: MikroORM
let scope: ReturnType<typeof createScope<EntityManager>>

beforeAll(async () => {
  url = await testDatabase('mikro_orm_review_s5b')
  await independentQuery(url, NOTES_DDL)
  await independentQuery(
    url,
    'ALTER TABLE notes ADD CONSTRAINT notes_v_deferred UNIQUE (v) DEFERRABLE INITIALLY DEFERRED',
  )
  app = uniqueAppName('mikro-s5b')
  orm = await initOrm(url, 2, app)
  scope = createScope({
    driver: mikroOrmDriver(orm),
    default: false,
    name: 'mikro-s5b',
    onError: () => {},
  })
})

beforeEach(async () => {
  await independentQuery(url, 'TRUNCATE notes')
})

afterAll(async () => {
  await scope.close()
})

const values = async () =>
  (await committedRows<{ v: string }>(url, 'SELECT v FROM notes ORDER BY id')).map((r) => r.v)

const settled = async (s: { stats(): { open: number; holding: number; waiting: number } }) => {
  await waitFor('the pool to settle', () => {
    const p = poolFigures(orm)
    return p.total === p.idle && p.waiting === 0
  })
  expect(s.stats()).toMatchObject({ open: 0, holding: 0, waiting: 0 })
  await expectNoIdleInTransaction(url, app)
  await waitFor('no backend active', async () =>
    (await backends(url, app)).every((r) => r.state !== 'active'),
  )
}

describe('a job aborted while a tracked MikroORM statement runs', () => {
  it('timeoutMs: cancelled, ScopeAbortedError (timeout) with the 57014 as cause, nothing committed, one release', async () => {
    const err = await scope
      .runJob(
        async () => {
          const em = await currentEntityManager(scope)
          em.persist(em.create(NoteSchema, { v: 'before-timeout' }))
          await em.flush()
          await scope.getSession().use((e) => e.execute('SELECT pg_sleep(30)'))
        },
        { name: 'sync', timeoutMs: 150 },
      )
      .catch((e: unknown) => e)
    expect(err).toBeInstanceOf(ScopeAbortedError)
    expect((err as ScopeAbortedError).kind).toBe('timeout')
    expect(((err as Error).cause as { code?: string })?.code).toBe('57014')
    expect(await values()).toEqual([])
    expect(scope.stats().totals).toMatchObject({ committed: 0 })
    await settled(scope)
  }, 15_000)

  it('signal: cancelled, nothing committed, the connection back, the next job works', async () => {
    const ac = new AbortController()
    const err = await scope
      .runJob(
        async () => {
          const em = await currentEntityManager(scope)
          em.persist(em.create(NoteSchema, { v: 'before-signal' }))
          setTimeout(() => ac.abort(), 100)
          await scope.getSession().use((e) => e.execute('SELECT pg_sleep(30)'))
        },
        { name: 'sync', signal: ac.signal },
      )
      .catch((e: unknown) => e)
    expect(err).toBeInstanceOf(Error)
    expect(await values()).toEqual([])
    await settled(scope)
    await scope.runJob(async () => {
      const em = await currentEntityManager(scope)
      em.persist(em.create(NoteSchema, { v: 'next' }))
    })
    expect(await values()).toEqual(['next'])
  }, 15_000)
})

describe('maxHoldMs under session.transaction(fn)', () => {
  it('transaction() rejects with SessionClosedError naming maxHoldMs; nothing committed; the connection destroyed once', async () => {
    const held = createScope({
      driver: mikroOrmDriver(orm),
      default: false,
      name: 'mikro-s5b-held',
      maxHoldMs: 200,
      onError: () => {},
    })
    const err = await held
      .run(
        async () => {
          const s = held.getSession()
          await s.transaction(async () => {
            const em = await currentEntityManager(held)
            em.persist(em.create(NoteSchema, { v: 'in-held-tx' }))
            await em.flush()
            await s.use((e) => e.execute('SELECT pg_sleep(2)'))
            em.persist(em.create(NoteSchema, { v: 'after-sleep' }))
          })
        },
        { transaction: 'none' },
      )
      .catch((e: unknown) => e)
    expect(err).toBeInstanceOf(SessionClosedError)
    expect((err as Error).message).toMatch(/maxHoldMs/)
    expect(await values()).toEqual([])
    expect(held.stats().totals).toMatchObject({
      forced: 1,
      destroyed: 1,
      acquired: 1,
      committed: 0,
    })
    await settled(held)
  }, 15_000)
})

describe('a unit of work whose COMMIT fails on a deferred constraint', () => {
  it('the end flushes fine, COMMIT refuses: the run rejects with the constraint error, nothing committed, afterRollback runs', async () => {
    const ran: string[] = []
    const committedBefore = scope.stats().totals.committed
    const err = await scope
      .run(async () => {
        const s = scope.getSession()
        s.afterCommit(() => void ran.push('afterCommit'))
        s.afterRollback(() => void ran.push('afterRollback'))
        const em = await currentEntityManager(scope)
        em.persist(em.create(NoteSchema, { v: 'dup' }))
        em.persist(em.create(NoteSchema, { v: 'dup' }))
      })
      .catch((e: unknown) => e)
    expect(err).toBeInstanceOf(Error)
    expect(`${(err as Error).message} ${(err as { code?: string }).code}`).toMatch(
      /notes_v_deferred|23505|duplicate key/,
    )
    expect(ran).toEqual(['afterRollback'])
    expect(await values()).toEqual([])
    expect(scope.stats().totals.committed).toBe(committedBefore)
    await settled(scope)
    await scope.run(async () => {
      const em = await currentEntityManager(scope)
      em.persist(em.create(NoteSchema, { v: 'next' }))
    })
    expect(await values()).toEqual(['next'])
  })

  it("an explicit em.flush() passes, the unit's COMMIT then fails: the caller sees it, the identity map is not reused", async () => {
    const err = await scope
      .run(async () => {
        const em = await currentEntityManager(scope)
        em.persist(em.create(NoteSchema, { v: 'dup2' }))
        await em.flush()
        em.persist(em.create(NoteSchema, { v: 'dup2' }))
        await em.flush() // deferred: accepted here
        return 'handler done'
      })
      .catch((e: unknown) => e)
    expect(err).toBeInstanceOf(Error)
    expect(`${(err as Error).message} ${(err as { code?: string }).code}`).toMatch(
      /notes_v_deferred|23505|duplicate key/,
    )
    expect(await values()).toEqual([])
    await settled(scope)
  })
})
