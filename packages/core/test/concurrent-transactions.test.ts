/**
 * Two transaction(fn) calls of one session at once. On its one connection the
 * second would become a savepoint inside the first, and a rollback of the first
 * would undo it after it had resolved: the second is refused before anything
 * of it runs. A transaction() inside the other's fn (awaited, in a timer, one
 * after another) is a savepoint as before.
 */
import { afterEach, describe, expect, it } from 'vitest'
import { createScope, type Scope, TransactionStateError } from '../src/index.ts'
import { type FakeConn, FakeDriver } from './fake-driver.ts'

const scopes: Scope<FakeConn>[] = []
function make() {
  const driver = new FakeDriver()
  const scope = createScope({ driver, default: false, leakDetectionMs: 0 })
  scopes.push(scope)
  return { driver, scope }
}
afterEach(async () => {
  await Promise.all(scopes.splice(0).map((s) => s.close({ timeoutMs: 100 })))
})

const refused =
  /called while another transaction\(fn\) of the session is running.*Nothing of it ran/s

/** Reject after the event loop turns once more: the sibling's statements had their chance to run. */
async function failLater(message: string): Promise<never> {
  await new Promise((r) => setTimeout(r, 5))
  throw new Error(message)
}

describe('transaction() beside a running transaction(fn) of the same session', () => {
  it('inside the unit of work (Promise.all of two): the second is refused before its SAVEPOINT; the first commits with the unit', async () => {
    const { driver, scope } = make()
    const settled = await scope.run(async () => {
      const s = scope.getSession()
      await s.use((c) => driver.query(c, 'INSERT before'))
      return Promise.allSettled([
        s.transaction(async () => {
          await s.use((c) => driver.query(c, 'INSERT t1'))
          await new Promise((r) => setTimeout(r, 5))
        }),
        s.transaction(async () => {
          await s.use((c) => driver.query(c, 'INSERT t2'))
        }),
      ])
    })
    expect(settled[0]!.status).toBe('fulfilled')
    const second = settled[1] as PromiseRejectedResult
    expect(second.reason).toBeInstanceOf(TransactionStateError)
    expect(second.reason.message).toMatch(refused)
    const log = driver.conns[0]!.log
    expect(log).not.toContain('INSERT t2')
    expect(log.filter((l) => l.startsWith('SAVEPOINT'))).toHaveLength(1)
    expect(log.at(-1)).toBe('COMMIT')
    expect(driver.checkedOut).toBe(0)
  })

  it('the first one failing later no longer undoes a second that resolved: the second never ran', async () => {
    const { driver, scope } = make()
    const settled = await scope.run(async () => {
      const s = scope.getSession()
      await s.use((c) => driver.query(c, 'INSERT before'))
      return Promise.allSettled([
        s.transaction(async () => {
          await s.use((c) => driver.query(c, 'INSERT t1'))
          return failLater('t1 failed')
        }),
        s.transaction(async () => {
          await s.use((c) => driver.query(c, 'INSERT t2'))
        }),
      ])
    })
    // Before: t2 resolved, then t1's ROLLBACK TO SAVEPOINT undid t2's insert without a word.
    expect(settled.map((x) => x.status)).toEqual(['rejected', 'rejected'])
    expect((settled[1] as PromiseRejectedResult).reason.message).toMatch(refused)
    expect(driver.conns[0]!.log).not.toContain('INSERT t2')
  })

  it('as the first statements of the scope: one is refused instead of nesting in the other', async () => {
    const { driver, scope } = make()
    const settled = await scope.run(async () => {
      const s = scope.getSession()
      return Promise.allSettled([
        s.transaction(async () => {
          await s.use((c) => driver.query(c, 'INSERT a'))
        }),
        s.transaction(async () => {
          await s.use((c) => driver.query(c, 'INSERT b'))
        }),
      ])
    })
    // Which one gets the BEGIN depends on the checkout's order of wake-ups; one of them only.
    const ran = settled.findIndex((x) => x.status === 'fulfilled')
    const other = settled[1 - ran] as PromiseRejectedResult
    expect(ran).not.toBe(-1)
    expect(other.reason.message).toMatch(refused)
    expect(driver.conns[0]!.log).toEqual(['BEGIN', `INSERT ${ran === 0 ? 'a' : 'b'}`, 'COMMIT'])
  })

  it('two at once inside one transaction(fn): the second of the siblings is refused, the outer goes on', async () => {
    const { driver, scope } = make()
    let inner: PromiseSettledResult<unknown>[] = []
    await scope.run(async () => {
      const s = scope.getSession()
      await s.transaction(async () => {
        inner = await Promise.allSettled([
          s.transaction(async () => {
            await s.use((c) => driver.query(c, 'INSERT x'))
          }),
          s.transaction(async () => {
            await s.use((c) => driver.query(c, 'INSERT y'))
          }),
        ])
        await s.use((c) => driver.query(c, 'INSERT after'))
      })
    })
    expect(inner.map((x) => x.status)).toEqual(['fulfilled', 'rejected'])
    const log = driver.conns[0]!.log
    expect(log).toContain('INSERT x')
    expect(log).not.toContain('INSERT y')
    expect(log.slice(-2)).toEqual(['INSERT after', 'COMMIT'])
  })
})

describe('transaction() inside a transaction(fn) is still a savepoint', () => {
  it('awaited, in a timer, in a promise chain, and one after another', async () => {
    const { driver, scope } = make()
    await scope.run(async () => {
      const s = scope.getSession()
      await s.use((c) => driver.query(c, 'INSERT before'))
      await s.transaction(async () => {
        await s.transaction(async () => {
          await s.transaction(() => s.use((c) => driver.query(c, 'INSERT deep')))
        })
        await new Promise<void>((resolve, reject) => {
          setTimeout(() => {
            s.transaction(() => s.use((c) => driver.query(c, 'INSERT timer'))).then(
              () => resolve(),
              reject,
            )
          }, 1)
        })
        await Promise.resolve().then(() =>
          s.transaction(() => s.use((c) => driver.query(c, 'INSERT chain'))),
        )
      })
      await s.transaction(() => s.use((c) => driver.query(c, 'INSERT next')))
    })
    const log = driver.conns[0]!.log
    for (const row of ['INSERT deep', 'INSERT timer', 'INSERT chain', 'INSERT next']) {
      expect(log).toContain(row)
    }
    expect(log.filter((l) => l.startsWith('SAVEPOINT'))).toHaveLength(6)
    expect(log.at(-1)).toBe('COMMIT')
  })

  it('a transaction(fn) started after another ended (sequential, not nested) runs', async () => {
    const { driver, scope } = make()
    await scope.run(async () => {
      const s = scope.getSession()
      const first = s.transaction(() => s.use((c) => driver.query(c, 'INSERT 1')))
      await first
      await s.transaction(() => s.use((c) => driver.query(c, 'INSERT 2')))
    })
    expect(driver.conns[0]!.log).toEqual([
      'BEGIN',
      'INSERT 1',
      'COMMIT',
      'BEGIN',
      'INSERT 2',
      'COMMIT',
    ])
  })
})
