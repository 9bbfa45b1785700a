/**
 * Problem 3 of the design: a session kept in module scope (a memoised
 * `getSession`) and used after its request or job ended. It must fail loudly
 * with SessionClosedError naming the session, and never open a connection.
 */
import { createScope, type Session, SessionClosedError } from '@scoped/core'
import { pgDriver } from '@scoped/pg'
import type pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { testDatabase } from '../support/db.ts'
import {
  committedRows,
  createTable,
  expectNoIdleInTransaction,
  expectPoolSettled,
  type TestPool,
  testPool,
} from './support.ts'

let url: string
let t: TestPool
let scope: ReturnType<typeof createScope<pg.PoolClient>>

beforeAll(async () => {
  url = await testDatabase('foundation_after_scope')
  await createTable(url, 'notes')
  t = testPool(url, 'after_scope', { max: 2 })
  scope = createScope({ driver: pgDriver(t.pool), default: false, name: 'after-scope' })
})

afterAll(async () => {
  await scope.close()
})

// The anti-pattern under test: a lazily created session cached at module level.
let cached: Session<pg.PoolClient> | undefined
function memoisedSession(): Session<pg.PoolClient> {
  cached ??= scope.getSession()
  return cached
}

describe('a session used after its scope ended', () => {
  it('throws SessionClosedError naming the session, and checks nothing out', async () => {
    await scope.run(
      async () => {
        await memoisedSession().use((c) => c.query("INSERT INTO notes (v) VALUES ('in scope')"))
      },
      { name: 'POST /notes' },
    )
    const acquired = scope.stats().totals.acquired
    const connects = t.connects()

    const late = memoisedSession().use((c) => c.query("INSERT INTO notes (v) VALUES ('late')"))
    await expect(late).rejects.toBeInstanceOf(SessionClosedError)
    const err = (await late.catch((e) => e)) as SessionClosedError
    expect(err.code).toBe('SESSION_CLOSED')
    expect(err.sessionName).toBe('POST /notes')
    expect(err.message).toContain("'POST /notes'")
    expect(err.message).toContain('use()')
    // captureStacks is on outside production: the message shows where the session first ran a
    // statement (the scope's end has no user frame to show), i.e. this test's memoised use.
    expect(err.message).toMatch(/First statement at:\n.*session-after-scope\.test\.ts/)

    for (const call of [
      () => memoisedSession().connection(),
      () => memoisedSession().transaction(async () => {}),
      () => memoisedSession().commit(),
    ]) {
      await expect(call()).rejects.toBeInstanceOf(SessionClosedError)
    }
    expect(() => memoisedSession().afterCommit(() => {})).toThrow(SessionClosedError)

    expect(scope.stats().totals.acquired).toBe(acquired)
    expect(t.connects()).toBe(connects)
    expectPoolSettled(t.pool)
    await expectNoIdleInTransaction(url, t.app)
    expect((await committedRows(url, 'SELECT v FROM notes')).map((r) => r.v)).toEqual(['in scope'])
  })

  it('fire-and-forget work that outlives its scope fails instead of using a closed session', async () => {
    let background: Promise<unknown> | undefined
    await scope.run(
      async () => {
        const session = scope.getSession()
        await session.use((c) => c.query('SELECT 1'))
        background = (async () => {
          await new Promise((r) => setTimeout(r, 20))
          return scope.getSession().use((c) => c.query("INSERT INTO notes (v) VALUES ('orphan')"))
        })()
      },
      { name: 'GET /fire-and-forget' },
    )
    const err = await background!.catch((e) => e)
    expect(err).toBeInstanceOf(SessionClosedError)
    expect((err as SessionClosedError).sessionName).toBe('GET /fire-and-forget')
    expectPoolSettled(t.pool)
    expect(await committedRows(url, "SELECT v FROM notes WHERE v = 'orphan'")).toEqual([])
  })

  it('a session kept after remove() says it was removed, and where', async () => {
    let kept: Session<pg.PoolClient> | undefined
    await scope.run(
      async () => {
        kept = scope.getSession()
        await kept.use((c) => c.query('SELECT 1'))
        await scope.remove()
        // The scope goes on with a new session; the removed one stays closed.
        await scope
          .getSession()
          .use((c) => c.query("INSERT INTO notes (v) VALUES ('after remove')"))
        await expect(kept.use((c) => c.query('SELECT 1'))).rejects.toThrow(
          /closed by remove\(\)[\s\S]*Closed at:\n.*session-after-scope\.test\.ts/,
        )
      },
      { name: 'POST /removed' },
    )
    expectPoolSettled(t.pool)
    expect(await committedRows(url, "SELECT v FROM notes WHERE v = 'after remove'")).toEqual([
      { v: 'after remove' },
    ])
  })
})
