/**
 * What is particular to MikroORM: the unit of work flushed at COMMIT, one
 * identity map per session (cleared at the end), a kept EntityManager failing
 * after its request, `transaction: 'none'` (autocommit on the session's
 * connection), and a broken connection destroyed.
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
  url = await testDatabase('mikro_orm_driver')
  await independentQuery(url, NOTES_DDL)
  app = uniqueAppName('mikro')
  orm = await initOrm(url, 2, app)
  scope = createScope({ driver: mikroOrmDriver(orm), default: false, name: 'mikro-orm' })
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
  await expectNoIdleInTransaction(url, app)
}

describe('the unit of work', () => {
  it('persist() without flush() is flushed and committed when the scope ends; a throw discards it', async () => {
    await scope.run(async () => {
      const em = await currentEntityManager(scope)
      em.persist(em.create(NoteSchema, { v: 'persisted-only' }))
    })
    expect(await values()).toEqual(['persisted-only'])

    const failed = scope.run(async () => {
      const em = await currentEntityManager(scope)
      em.persist(em.create(NoteSchema, { v: 'flushed-then-thrown' }))
      await em.flush()
      em.persist(em.create(NoteSchema, { v: 'never-flushed' }))
      throw new Error('planned')
    })
    await expect(failed).rejects.toThrow('planned')
    expect(await values()).toEqual(['persisted-only'])
    await expectPoolIdle()
  })

  it('an inner throw in a nested transaction() drops what was persisted inside it, keeps the rest', async () => {
    await scope.run(async () => {
      const session = scope.getSession()
      const em = await currentEntityManager(scope)
      em.persist(em.create(NoteSchema, { v: 'outer-unflushed' }))
      await expect(
        session.transaction(async () => {
          em.persist(em.create(NoteSchema, { v: 'inner-flushed' }))
          await em.flush()
          em.persist(em.create(NoteSchema, { v: 'inner-unflushed' }))
          throw new Error('inner fails')
        }),
      ).rejects.toThrow('inner fails')
      em.persist(em.create(NoteSchema, { v: 'outer-after' }))
    })
    // Entering the savepoint flushed the outer change first, so the inner rollback kept it.
    expect(await values()).toEqual(['outer-unflushed', 'outer-after'])
    await expectPoolIdle()
  })

  it('each session has its own identity map, emptied when the session ends', async () => {
    await scope.run(async () => {
      const em = await currentEntityManager(scope)
      em.create(NoteSchema, { v: 'shared' })
    })
    const first = gate()
    const seen: EntityManager[] = []
    const a = scope.run(async () => {
      const em = await currentEntityManager(scope)
      seen.push(em)
      const note = await em.findOneOrFail(NoteSchema, { v: 'shared' })
      note.v = 'changed-in-a-only'
      await first.promise
      // b's change to its own copy is not visible here.
      expect(note.v).toBe('changed-in-a-only')
    })
    const b = scope.run(async () => {
      const em = await currentEntityManager(scope)
      seen.push(em)
      const note = await em.findOneOrFail(NoteSchema, { v: 'shared' })
      expect(note.v).toBe('shared')
      first.open()
    })
    await Promise.all([a, b])
    expect(seen[0] === seen[1]).toBe(false)
    for (const em of seen) expect(em.getUnitOfWork().getIdentityMap().values()).toEqual([])
    expect(await values()).toEqual(['changed-in-a-only'])
  })
})

describe("inside MikroORM's RequestContext", () => {
  it("the session's EntityManager is a fork of the context's, on the session's connection", async () => {
    const { RequestContext } = await import('@mikro-orm/core')
    const outer = orm.em.fork()
    outer.setFilterParams('mark', { v: 'context-param' })
    await RequestContext.create(outer, () =>
      scope.run(async () => {
        const em = await currentEntityManager(scope)
        expect(em).not.toBe(outer)
        // Forked from the context's EntityManager: its filter parameters came along.
        expect(em.getFilterParams('mark')).toEqual({ v: 'context-param' })
        em.persist(em.create(NoteSchema, { v: 'in-request-context' }))
        const pidOf = async () =>
          ((await em.execute('SELECT pg_backend_pid() AS pid')) as { pid: number }[])[0]!.pid
        const pid = await pidOf()
        const again = await pidOf()
        expect(again).toBe(pid)
      }),
    )
    expect(await values()).toEqual(['in-request-context'])
    await expectPoolIdle()
  })
})

describe('misuse fails loudly', () => {
  it('an EntityManager kept past its request throws instead of writing outside any session', async () => {
    let kept: EntityManager | undefined
    await scope.run(async () => {
      kept = await currentEntityManager(scope)
      kept.persist(kept.create(NoteSchema, { v: 'in-time' }))
    })
    const late = kept!.create(NoteSchema, { v: 'too-late' })
    // MikroORM wraps every error of a query in its DriverException; the code and message are ours.
    const closed = { code: 'SESSION_CLOSED', message: expect.stringMatching(/which is closed/) }
    await expect(kept!.persistAndFlush(late)).rejects.toMatchObject(closed)
    await expect(kept!.find(NoteSchema, {})).rejects.toMatchObject(closed)
    // Past the transaction context, on the connection the fork was bound to (now back in the pool).
    await expect(kept!.getConnection().execute('SELECT 1')).rejects.toMatchObject(closed)
    expect(() => kept!.getKnex()).toThrow(/which is closed/)
    expect(await values()).toEqual(['in-time'])
    await expectPoolIdle()
  })

  it("in transaction: 'none', the EntityManager runs autocommit on the session's connection; its flush and em.transactional() are transactions of their own there", async () => {
    const notes = () =>
      committedRows<{ v: string; pid: number; txid: string }>(
        url,
        'SELECT v, pid, txid::text AS txid FROM notes ORDER BY id',
      )
    let pid = 0
    await scope.run(
      async () => {
        const em = await currentEntityManager(scope)
        const [a] = await em.execute('SELECT pg_backend_pid() AS pid, txid_current()::text AS tx')
        const [b] = await em.execute('SELECT pg_backend_pid() AS pid, txid_current()::text AS tx')
        pid = a!.pid
        // One connection, no transaction held across statements.
        expect(b!.pid).toBe(pid)
        expect(b!.tx).not.toBe(a!.tx)
        expect(scope.getSession().inTransaction).toBe(false)

        // em.flush(): both rows in one transaction of its own, committed before the scope ends.
        em.persist(em.create(NoteSchema, { v: 'flush-1' }))
        em.persist(em.create(NoteSchema, { v: 'flush-2' }))
        await em.flush()
        const flushed = await notes()
        expect(flushed.map((n) => [n.v, n.pid])).toEqual([
          ['flush-1', pid],
          ['flush-2', pid],
        ])
        expect(flushed[0]!.txid).toBe(flushed[1]!.txid)

        // em.transactional(): a throw rolls its transaction back.
        await expect(
          em.transactional(async (inner) => {
            inner.persist(inner.create(NoteSchema, { v: 'transactional-dropped' }))
            await inner.flush()
            throw new Error('planned')
          }),
        ).rejects.toThrow('planned')

        // session.transaction(fn): the EntityManager joins it; committed when fn ends.
        await scope.getSession().transaction(async () => {
          em.persist(em.create(NoteSchema, { v: 'in-session-transaction' }))
        })
        // Persisted, never flushed: autocommit flushes nothing at the end.
        em.persist(em.create(NoteSchema, { v: 'never-flushed' }))
      },
      { transaction: 'none' },
    )
    const rows = await notes()
    expect(rows.map((n) => n.v)).toEqual(['flush-1', 'flush-2', 'in-session-transaction'])
    expect(new Set(rows.map((n) => n.pid))).toEqual(new Set([pid]))
    await expectPoolIdle()
  })
})

describe('connections that must not be reused', () => {
  it('a backend terminated mid-request is destroyed; the next request gets a working one', async () => {
    let deadPid = 0
    const run = scope.run(async () => {
      const em = await currentEntityManager(scope)
      ;[{ pid: deadPid }] = await em.execute('SELECT pg_backend_pid() AS pid')
      await independentQuery(url, 'SELECT pg_terminate_backend($1)', [deadPid])
      em.persist(em.create(NoteSchema, { v: 'lost' }))
      await em.flush()
    })
    await expect(run).rejects.toThrow(/terminat|Connection/i)
    expect(scope.stats().totals.destroyed).toBeGreaterThanOrEqual(1)
    for (let i = 0; i < 3; i++) {
      await scope.run(async () => {
        const em = await currentEntityManager(scope)
        const [row] = await em.execute('SELECT pg_backend_pid() AS pid')
        expect(row!.pid).not.toBe(deadPid)
        em.persist(em.create(NoteSchema, { v: `fresh-${i}` }))
      })
    }
    expect(await values()).toEqual(['fresh-0', 'fresh-1', 'fresh-2'])
    await expectPoolIdle()
    expect(poolFigures(orm).total).toBeLessThanOrEqual(2)
  })
})

describe('sessions one after another on one connection', () => {
  // Every session on a connection after its first reuses that connection's knex transaction
  // context and sends BEGIN/COMMIT/ROLLBACK itself: each session must still get its own
  // transaction, with its own options, its savepoints, and MikroORM's transaction events.
  let one: MikroORM
  let serial: ReturnType<typeof createScope<EntityManager>>
  beforeAll(async () => {
    one = await initOrm(url, 1, uniqueAppName('mikro_one'))
    serial = createScope({ driver: mikroOrmDriver(one), default: false, name: 'mikro-one' })
  })
  afterAll(async () => {
    await serial.close()
  })

  const settings = async (em: EntityManager) => {
    const [row] = await em.execute(
      "SELECT current_setting('transaction_isolation') AS iso, current_setting('transaction_read_only') AS ro, pg_backend_pid() AS pid, txid_current() AS tx",
    )
    return row as { iso: string; ro: string; pid: number; tx: string }
  }

  it('each gets its own transaction and options, savepoints work, and the events fire for each', async () => {
    const events: string[] = []
    const ems = new Set<unknown>()
    const record =
      (name: string) =>
      (args: { em: unknown }): void => {
        events.push(name)
        ems.add(args.em)
      }
    one.em.getEventManager().registerSubscriber({
      beforeTransactionStart: record('beforeStart'),
      afterTransactionStart: record('afterStart'),
      beforeTransactionCommit: record('beforeCommit'),
      afterTransactionCommit: record('afterCommit'),
      beforeTransactionRollback: record('beforeRollback'),
      afterTransactionRollback: record('afterRollback'),
    })

    const seen: { iso: string; ro: string; pid: number; tx: string }[] = []
    const sessionEms: EntityManager[] = []
    await serial.run(async () => {
      const em = await currentEntityManager(serial)
      sessionEms.push(em)
      seen.push(await settings(em))
      em.persist(em.create(NoteSchema, { v: 'first' }))
    })
    await serial.run(
      async () => {
        await serial.getSession().transaction(
          async () => {
            const em = await currentEntityManager(serial)
            sessionEms.push(em)
            seen.push(await settings(em))
          },
          { isolation: 'serializable', readOnly: true },
        )
      },
      { transaction: 'none' },
    )
    await expect(
      serial.run(async () => {
        const em = await currentEntityManager(serial)
        sessionEms.push(em)
        seen.push(await settings(em))
        em.persist(em.create(NoteSchema, { v: 'rolled-back' }))
        await em.flush()
        throw new Error('planned')
      }),
    ).rejects.toThrow('planned')
    await serial.run(async () => {
      const session = serial.getSession()
      const em = await currentEntityManager(serial)
      sessionEms.push(em)
      seen.push(await settings(em))
      await session.transaction(async () => {
        em.persist(em.create(NoteSchema, { v: 'savepoint-kept' }))
      })
      await expect(
        session.transaction(async () => {
          em.persist(em.create(NoteSchema, { v: 'savepoint-dropped' }))
          await em.flush()
          throw new Error('inner')
        }),
      ).rejects.toThrow('inner')
      em.persist(em.create(NoteSchema, { v: 'last' }))
    })

    expect(new Set(seen.map((s) => s.pid)).size).toBe(1)
    expect(new Set(seen.map((s) => s.tx)).size).toBe(seen.length)
    expect(seen.map((s) => [s.iso, s.ro])).toEqual([
      ['read committed', 'off'],
      ['serializable', 'on'],
      ['read committed', 'off'],
      ['read committed', 'off'],
    ])
    expect(await values()).toEqual(['first', 'savepoint-kept', 'last'])
    const session = ['beforeStart', 'afterStart']
    expect(events).toEqual([
      ...session,
      'beforeCommit',
      'afterCommit',
      ...session,
      'beforeCommit',
      'afterCommit',
      ...session,
      'beforeRollback',
      'afterRollback',
      ...session,
      'beforeCommit',
      'afterCommit',
    ])
    expect([...ems]).toEqual(sessionEms)
    const p = poolFigures(one)
    expect([p.total, p.idle, p.waiting]).toEqual([1, 1, 0])
  })

  it('the BEGIN sent with the first statement: with bind values too, a rollback, and a session that sent nothing', async () => {
    const txOf = async (em: EntityManager) =>
      ((await em.execute('SELECT txid_current()::text AS tx')) as { tx: string }[])[0]!.tx
    // Warm: the connection's first session made its knex transaction context.
    await serial.run(async () => void (await currentEntityManager(serial)))
    await serial.run(async () => {
      const em = await currentEntityManager(serial)
      // knex with bind values (the extended protocol): BEGIN goes just before it instead.
      const ctx = em.getTransactionContext() as unknown as {
        raw(sql: string, b: unknown[]): Promise<{ rows: { tx: string; x: number }[] }>
      }
      const { rows } = await ctx.raw('SELECT txid_current()::text AS tx, ?::int AS x', [7])
      expect(rows[0]!.x).toBe(7)
      expect(await txOf(em)).toBe(rows[0]!.tx)
      em.persist(em.create(NoteSchema, { v: 'after-bound-first' }))
    })
    await expect(
      serial.run(async () => {
        const em = await currentEntityManager(serial)
        em.persist(em.create(NoteSchema, { v: 'rolled-back-first' }))
        await em.flush()
        throw new Error('planned')
      }),
    ).rejects.toThrow('planned')
    // Began, sent nothing, ended: the connection is clean for the next one.
    await serial.run(async () => void (await currentEntityManager(serial)))
    await serial.run(
      async () => {
        const em = await currentEntityManager(serial)
        const [a] = await em.execute('SELECT txid_current()::text AS tx')
        const [b] = await em.execute('SELECT txid_current()::text AS tx')
        expect(b!.tx).not.toBe(a!.tx)
      },
      { transaction: 'none' },
    )
    expect(await values()).toEqual(['after-bound-first'])
    await expectNoIdleInTransaction(url, app)
    const p = poolFigures(one)
    expect([p.total, p.idle, p.waiting]).toEqual([1, 1, 0])
  })

  it('a flush subscriber still sees the flush at COMMIT of a session that changed nothing', async () => {
    let flushes = 0
    one.em.getEventManager().registerSubscriber({ beforeFlush: () => void flushes++ })
    await serial.run(async () => {
      const em = await currentEntityManager(serial)
      await settings(em)
    })
    expect(flushes).toBe(1)
  })
})
