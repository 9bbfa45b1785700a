import { afterEach, describe, expect, it, vi } from 'vitest'
import {
  createScope,
  NoActiveScopeError,
  PoolTimeoutError,
  type Scope,
  ScopeAbortedError,
  ScopeClosedError,
  SessionClosedError,
  TransactionStateError,
} from '../src/index.ts'
import { type FakeConn, FakeDriver } from './fake-driver.ts'

const scopes: Scope<FakeConn>[] = []
function make(driver = new FakeDriver(), opts: Record<string, unknown> = {}) {
  const scope = createScope({ driver, default: false, leakDetectionMs: 0, ...opts })
  scopes.push(scope)
  return { driver, scope }
}
afterEach(async () => {
  await Promise.all(scopes.splice(0).map((s) => s.close({ timeoutMs: 100 })))
})

const q = (
  scope: Scope<FakeConn>,
  driver: FakeDriver,
  sql: string,
  o?: { ms?: number; fail?: unknown },
) => scope.getSession().use((c) => driver.query(c, sql, o))

describe('lazy checkout', () => {
  it('a scope that never touches the database checks out nothing', async () => {
    const { driver, scope } = make()
    await scope.run(async () => {
      const s = scope.getSession()
      expect(s.state).toBe('idle')
    })
    expect(driver.events).toEqual([])
    expect(scope.stats().totals.acquired).toBe(0)
  })

  it('concurrent first uses share one checkout and one BEGIN', async () => {
    const { driver, scope } = make()
    driver.delay('acquire', 5)
    await scope.run(async () => {
      await Promise.all(Array.from({ length: 10 }, (_, i) => q(scope, driver, `q${i}`)))
    })
    expect(driver.events.filter((e) => e === 'acquire')).toHaveLength(1)
    expect(driver.events.filter((e) => e === 'begin')).toHaveLength(1)
    expect(driver.conns[0]!.log.filter((l) => l.startsWith('q'))).toHaveLength(10)
  })

  it.each(['none', 'auto'] as const)(
    "uses start in call order, even one made as the checkout lands (transaction: '%s')",
    async (transaction) => {
      const { driver, scope } = make(new FakeDriver(), { transaction })
      const started: string[] = []
      const use = (name: string) =>
        scope.getSession().use(async () => {
          started.push(name)
        })
      const acquire = driver.acquire.bind(driver)
      let late: Promise<void> | undefined
      driver.acquire = (signal) => {
        const delivered = acquire(signal)
        // Registered after the session's own reaction to the checkout: C is called when the
        // connection is already held, while B (called before it) still waits for its turn.
        queueMicrotask(() => {
          delivered.then(() => {
            late = use('C')
          })
        })
        return delivered
      }
      await scope.run(async () => {
        await Promise.all([use('A'), use('B')])
        await late
      })
      expect(started).toEqual(['A', 'B', 'C'])
    },
  )
})

describe('unit of work (auto)', () => {
  it('commits when the scope resolves and releases to the pool', async () => {
    const { driver, scope } = make()
    const r = await scope.run(async () => q(scope, driver, 'INSERT'))
    expect(r).toBe('INSERT')
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'INSERT', 'COMMIT'])
    expect(driver.releases).toEqual([
      { id: 1, destroy: false, busy: 0, status: 'I', marked: false },
    ])
    expect(scope.stats().totals).toMatchObject({ committed: 1, rolledBack: 0, acquired: 1 })
  })

  it('rolls back when the scope throws and rethrows the error', async () => {
    const { driver, scope } = make()
    const err = new Error('handler failed')
    await expect(
      scope.run(async () => {
        await q(scope, driver, 'INSERT')
        throw err
      }),
    ).rejects.toBe(err)
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'INSERT', 'ROLLBACK'])
    expect(driver.checkedOut).toBe(0)
  })

  it('setRollbackOnly() rolls back a scope that resolves', async () => {
    const { driver, scope } = make()
    await scope.run(async () => {
      await q(scope, driver, 'INSERT')
      scope.getSession().setRollbackOnly()
    })
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'INSERT', 'ROLLBACK'])
  })

  it('after an explicit commit() the next statement begins a new transaction', async () => {
    const { driver, scope } = make()
    await scope.run(async () => {
      await q(scope, driver, 'A')
      await scope.getSession().commit()
      await q(scope, driver, 'B')
    })
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'A', 'COMMIT', 'BEGIN', 'B', 'COMMIT'])
    expect(driver.events.filter((e) => e === 'acquire')).toHaveLength(1)
  })

  it("transaction: 'none' is autocommit; transaction(fn) still runs BEGIN/COMMIT", async () => {
    const { driver, scope } = make(new FakeDriver(), { transaction: 'none' })
    await scope.run(async () => {
      await q(scope, driver, 'A')
      await scope.getSession().transaction(async () => {
        await q(scope, driver, 'B')
      })
    })
    expect(driver.conns[0]!.log).toEqual(['A', 'BEGIN', 'B', 'COMMIT'])
  })

  it('a failed COMMIT rejects the scope and counts a rollback', async () => {
    const { driver, scope } = make()
    driver.failNext('commit', new Error('deferred constraint'))
    await expect(scope.run(async () => q(scope, driver, 'INSERT'))).rejects.toThrow(
      'deferred constraint',
    )
    expect(scope.stats().totals).toMatchObject({ committed: 0, rolledBack: 1 })
    expect(driver.checkedOut).toBe(0)
  })

  it('a fatal error destroys the connection instead of returning it', async () => {
    const { driver, scope } = make()
    await expect(
      scope.run(async () => q(scope, driver, 'X', { fail: new Error('fatal: connection reset') })),
    ).rejects.toThrow('fatal')
    expect(driver.releases[0]!.destroy).toBe(true)
    expect(scope.stats().totals.destroyed).toBe(1)
  })

  it('a fatal error that the handler swallowed fails the commit loudly', async () => {
    const { driver, scope } = make()
    await expect(
      scope.run(async () => {
        await q(scope, driver, 'X', { fail: new Error('fatal: terminated') }).catch(() => {})
      }),
    ).rejects.toThrow(TransactionStateError)
    expect(driver.releases[0]!.destroy).toBe(true)
  })
})

describe('nesting and hooks', () => {
  it('an inner transaction() throw rolls back to its savepoint only; its afterCommit is dropped', async () => {
    const { driver, scope } = make()
    const ran: string[] = []
    await scope.run(async () => {
      const s = scope.getSession()
      await q(scope, driver, 'outer')
      s.afterCommit(() => {
        ran.push('outer-hook')
      })
      await expect(
        s.transaction(async () => {
          await q(scope, driver, 'inner')
          s.afterCommit(() => {
            ran.push('inner-hook')
          })
          s.afterRollback(() => {
            ran.push('inner-rolled-back')
          })
          throw new Error('inner failed')
        }),
      ).rejects.toThrow('inner failed')
      await s.transaction(async () => {
        s.afterCommit(() => {
          ran.push('kept-hook')
        })
      })
    })
    expect(driver.conns[0]!.log).toEqual([
      'BEGIN',
      'outer',
      'SAVEPOINT scoped_sp_1',
      'inner',
      'ROLLBACK TO scoped_sp_1',
      'SAVEPOINT scoped_sp_2',
      'RELEASE scoped_sp_2',
      'COMMIT',
    ])
    expect(ran).toEqual(['inner-rolled-back', 'outer-hook', 'kept-hook'])
  })

  it('hooks run after COMMIT, in order; a failing hook is reported and does not fail the commit', async () => {
    const onError = vi.fn()
    const { driver, scope } = make(new FakeDriver(), { onError })
    const order: string[] = []
    await scope.run(async () => {
      const s = scope.getSession()
      await q(scope, driver, 'A')
      s.afterCommit(async () => {
        order.push(`1:${driver.conns[0]!.log.at(-1)}`)
      })
      s.afterCommit(() => {
        throw new Error('hook broke')
      })
      s.afterCommit(() => {
        order.push('3')
      })
    })
    expect(order).toEqual(['1:COMMIT', '3'])
    expect(onError).toHaveBeenCalledWith(expect.objectContaining({ message: 'hook broke' }), {
      during: 'afterCommit',
      session: 'run',
    })
    expect(scope.stats().totals.committed).toBe(1)
  })

  it('afterCommit registered before any statement runs at the end of the unit of work', async () => {
    const { scope } = make()
    const ran: string[] = []
    await scope.run(async () => {
      scope.getSession().afterCommit(() => {
        ran.push('committed')
      })
      scope.getSession().afterRollback(() => {
        ran.push('rolled back')
      })
    })
    expect(ran).toEqual(['committed'])
  })

  it('isolation on a nested transaction is refused with the fix', async () => {
    const { driver, scope } = make()
    await scope.run(async () => {
      await q(scope, driver, 'A')
      await expect(
        scope.getSession().transaction(async () => {}, { isolation: 'serializable' }),
      ).rejects.toThrow(/nested in an open transaction.*cannot set isolation/)
    })
  })

  it('the outermost transaction(fn, { retry }) re-runs fn from BEGIN on a retryable error', async () => {
    const { driver, scope } = make()
    let runs = 0
    const result = await scope.run(async () =>
      scope.getSession().transaction(
        async () => {
          runs++
          if (runs < 3) throw Object.assign(new Error('could not serialize'), { code: '40001' })
          return q(scope, driver, 'ok')
        },
        { isolation: 'serializable', retry: { attempts: 3, backoffMs: 1 } },
      ),
    )
    expect(result).toBe('ok')
    expect(runs).toBe(3)
    expect(driver.conns[0]!.log.filter((l) => l.startsWith('BEGIN'))).toEqual([
      'BEGIN serializable',
      'BEGIN serializable',
      'BEGIN serializable',
    ])
  })

  it('a transaction() started beside a running one is refused before it runs; the unit commits the rest (concurrent-transactions.test.ts)', async () => {
    const { driver, scope } = make()
    await scope.run(async () => {
      const s = scope.getSession()
      await q(scope, driver, 'A')
      // Before: the second's savepoint nested in the first's, the first ended out of order, and
      // nothing of the unit could be trusted (rolled back, connection destroyed).
      const first = s.transaction(async () => {
        await q(scope, driver, 'first', { ms: 5 })
      })
      const second = s.transaction(async () => {
        await q(scope, driver, 'second', { ms: 30 })
      })
      const results = await Promise.allSettled([first, second])
      expect(results[0]!.status).toBe('fulfilled')
      expect((results[1] as PromiseRejectedResult).reason).toBeInstanceOf(TransactionStateError)
    })
    expect(driver.conns[0]!.log).not.toContain('second')
    expect(driver.conns[0]!.log.at(-1)).toBe('COMMIT')
    expect(driver.releases[0]!.destroy).toBe(false)
  })

  it('commit() inside transaction(fn) is a TransactionStateError', async () => {
    const { scope } = make()
    await scope.run(async () => {
      const s = scope.getSession()
      await expect(s.transaction(() => s.commit())).rejects.toBeInstanceOf(TransactionStateError)
    })
  })
})

describe('close', () => {
  it('waits for tracked uses before COMMIT and release', async () => {
    const { driver, scope } = make()
    let slow: Promise<unknown> | undefined
    await scope.run(async () => {
      slow = q(scope, driver, 'slow', { ms: 30 })
    })
    await slow
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'slow', 'COMMIT'])
    expect(driver.releases[0]!.busy).toBe(0)
  })

  it('runs once: a second close returns the same promise', async () => {
    const { driver, scope } = make()
    const open = scope.open({ name: 'req' })
    await open.enter(() => q(scope, driver, 'A'))
    const a = open.end({ commit: true })
    const b = open.end({ commit: false })
    expect(a).toBe(b)
    await a
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'A', 'COMMIT'])
    expect(driver.releases).toHaveLength(1)
  })

  it('a session used after its scope ended throws SessionClosedError naming it, and checks nothing out', async () => {
    const { driver, scope } = make()
    let kept: ReturnType<typeof scope.getSession> | undefined
    await scope.run(
      async () => {
        kept = scope.getSession()
      },
      { name: 'GET /orders/:id' },
    )
    const before = driver.events.length
    await expect(kept!.use(async () => 1)).rejects.toThrow(SessionClosedError)
    await expect(kept!.use(async () => 1)).rejects.toThrow(/GET \/orders\/:id/)
    expect(driver.events.length).toBe(before)
  })

  it('a promise left running after its scope ended fails loudly instead of opening a new session', async () => {
    const { driver, scope } = make()
    let later: Promise<unknown> | undefined
    await scope.run(async () => {
      later = new Promise((r) => setTimeout(r, 10)).then(() => q(scope, driver, 'late'))
    })
    await expect(later).rejects.toBeInstanceOf(SessionClosedError)
    expect(driver.events.filter((e) => e === 'acquire')).toHaveLength(0)
  })

  it('remove() closes the session now; the next getSession() opens a new one', async () => {
    const { driver, scope } = make()
    await scope.run(async () => {
      const first = scope.getSession()
      await q(scope, driver, 'A')
      await scope.remove()
      expect(first.state).toBe('closed')
      const second = scope.getSession()
      expect(second).not.toBe(first)
      await q(scope, driver, 'B')
    })
    expect(driver.events.filter((e) => e === 'acquire')).toHaveLength(2)
    expect(driver.checkedOut).toBe(0)
  })
})

describe('scopes', () => {
  it('getSession() outside a scope throws NoActiveScopeError with the fix', () => {
    const { scope } = make()
    expect(() => scope.getSession()).toThrow(NoActiveScopeError)
    expect(() => scope.getSession()).toThrow(/app\.use\(scopedSession\(\)\).*runJob/)
    expect(scope.hasSession()).toBe(false)
  })

  it('nested scopes are independent', async () => {
    const { driver, scope } = make()
    await scope.run(async () => {
      const outer = scope.getSession()
      await q(scope, driver, 'outer')
      await scope.runJob(
        async () => {
          expect(scope.getSession()).not.toBe(outer)
          await q(scope, driver, 'inner')
        },
        { name: 'audit' },
      )
      expect(scope.getSession()).toBe(outer)
      expect(outer.state).toBe('active')
    })
    expect(driver.conns.map((c) => c.log)).toEqual([
      ['BEGIN', 'outer', 'COMMIT'],
      ['BEGIN', 'inner', 'COMMIT'],
    ])
  })

  it('two concurrent scopes never see each other’s session', async () => {
    const { scope } = make()
    const ids = await Promise.all(
      [1, 2, 3].map((i) =>
        scope.run(async () => {
          const id = scope.getSession().id
          await new Promise((r) => setTimeout(r, 5 * i))
          expect(scope.getSession().id).toBe(id)
          return id
        }),
      ),
    )
    expect(new Set(ids).size).toBe(3)
  })
})

describe('pool limits', () => {
  it('acquireTimeoutMs: PoolTimeoutError lists the pool figures and every holder', async () => {
    const { driver, scope } = make(new FakeDriver(2), { acquireTimeoutMs: 50, captureStacks: true })
    let release!: () => void
    const gate = new Promise<void>((r) => {
      release = r
    })
    const holders = ['GET /a', 'job:sync'].map((name) =>
      scope.run(
        async () => {
          await q(scope, driver, name)
          await gate
        },
        { name },
      ),
    )
    await new Promise((r) => setTimeout(r, 5))
    const err = await scope
      .run(async () => q(scope, driver, 'third'), { name: 'GET /c' })
      .catch((e: unknown) => e)
    expect(err).toBeInstanceOf(PoolTimeoutError)
    const msg = (err as Error).message
    expect(msg).toMatch(/'GET \/c' waited 50 ms/)
    expect(msg).toMatch(/2\/2 in use/)
    expect(msg).toMatch(/'GET \/a'.*held \d+ ms, in-transaction, acquired at .*session\.test\.ts/)
    expect(msg).toMatch(/'job:sync'/)
    expect((err as PoolTimeoutError).holders.map((h) => h.name).sort()).toEqual([
      'GET /a',
      'job:sync',
    ])
    expect(scope.stats().totals.timeouts).toBe(1)
    release()
    await Promise.all(holders)
    expect(driver.checkedOut).toBe(0)
  })

  it('a connection delivered after the waiter gave up goes straight back to the pool', async () => {
    const { driver, scope } = make(new FakeDriver(1), { acquireTimeoutMs: 20 })
    driver.delay('acquire', 60) // a driver that cannot cancel its checkout
    await expect(scope.run(async () => q(scope, driver, 'x'))).rejects.toBeInstanceOf(
      PoolTimeoutError,
    )
    await new Promise((r) => setTimeout(r, 80))
    expect(driver.checkedOut).toBe(0)
    expect(driver.releases).toHaveLength(1)
  })

  it('leakDetectionMs warns with the holder and the acquisition stack', async () => {
    const warn = vi.fn()
    const { driver, scope } = make(new FakeDriver(), {
      leakDetectionMs: 20,
      captureStacks: true,
      logger: { warn, error: vi.fn() },
    })
    await scope.run(
      async () => {
        await q(scope, driver, 'A')
        await new Promise((r) => setTimeout(r, 50))
      },
      { name: 'GET /slow' },
    )
    expect(warn).toHaveBeenCalledTimes(1)
    expect(warn.mock.calls[0]![0]).toMatch(
      /Possible connection leak: session 'GET \/slow'.*Acquired at:\n.*session\.test\.ts/s,
    )
    expect(scope.stats().totals.leaks).toBe(1)
  })

  it('maxHoldMs destroys the connection even under a running handler; later use throws', async () => {
    const { driver, scope } = make(new FakeDriver(), { maxHoldMs: 20 })
    const err = await scope
      .run(
        async () => {
          await q(scope, driver, 'A')
          await new Promise((r) => setTimeout(r, 50))
          await q(scope, driver, 'B')
        },
        { name: 'GET /hung' },
      )
      .catch((e: unknown) => e)
    expect(err).toBeInstanceOf(SessionClosedError)
    expect((err as Error).message).toMatch(
      /GET \/hung.*destroyed after being held 20 ms \(maxHoldMs\)/,
    )
    expect(driver.releases).toEqual([{ id: 1, destroy: true, busy: 0, status: 'T', marked: false }])
    expect(scope.stats().totals.forced).toBe(1)
  })

  it('a handler that resolves after its connection was taken by force does not report success', async () => {
    const { driver, scope } = make(new FakeDriver(), { maxHoldMs: 10 })
    await expect(
      scope.run(async () => {
        await q(scope, driver, 'A')
        await new Promise((r) => setTimeout(r, 30))
      }),
    ).rejects.toThrow(/was not committed.*maxHoldMs/)
  })
})

describe('open({ name }) given a function', () => {
  it('is asked when the name is read: the session takes the name of the moment it is made', async () => {
    const { driver, scope } = make()
    let route = 'GET /*'
    let asked = 0
    const open = scope.open({
      name: () => {
        asked++
        return route
      },
      kind: 'request',
    })
    expect(asked).toBe(0)
    expect(open.name).toBe('GET /*')
    route = 'GET /orders/:id'
    await open.enter(async () => {
      expect(scope.getSession().name).toBe('GET /orders/:id')
      await q(scope, driver, 'A')
    })
    route = 'changed later'
    expect(open.existingSession!.name).toBe('GET /orders/:id')
    open.abort('client-abort')
    await expect(open.end({ commit: true })).rejects.toThrow(/'changed later'/)
    await expect(scope.run(async () => {}, { name: (() => 'x') as never })).rejects.toThrow(
      /run\(fn, \{ name \}\): expected a non-empty string, got function/,
    )
  })
})

describe('abort', () => {
  it('abort marks the unit rollback-only, aborts session.signal, keeps the connection until the end', async () => {
    const { driver, scope } = make()
    const open = scope.open({ name: 'POST /x', kind: 'request' })
    const seen: string[] = []
    await open.enter(async () => {
      const s = scope.getSession()
      await q(scope, driver, 'A')
      s.signal.addEventListener('abort', () => seen.push('aborted'))
      open.abort('client-abort')
      expect(driver.checkedOut).toBe(1)
      await expect(q(scope, driver, 'B')).rejects.toBeInstanceOf(ScopeAbortedError)
    })
    await expect(open.end({ commit: true })).rejects.toThrow(/client closed the connection/)
    expect(seen).toEqual(['aborted'])
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'A', 'ROLLBACK'])
    expect(driver.checkedOut).toBe(0)
  })

  it('an abort that arrives while end() is committing does not turn the commit into a failure', async () => {
    const { driver, scope } = make()
    driver.delay('commit', 20)
    const open = scope.open({ name: 'POST /x', kind: 'request' })
    await open.enter(() => q(scope, driver, 'A'))
    const ending = open.end({ commit: true })
    open.abort('client-abort')
    await expect(ending).resolves.toBe('committed')
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'A', 'COMMIT'])
  })

  it('runJob timeoutMs aborts the job, rolls it back, and rejects with the timeout', async () => {
    const { driver, scope } = make()
    const err = await scope
      .runJob(
        async () => {
          await q(scope, driver, 'A')
          await new Promise((r) => setTimeout(r, 40))
        },
        { name: 'sync', timeoutMs: 10 },
      )
      .catch((e: unknown) => e)
    expect(err).toBeInstanceOf(ScopeAbortedError)
    expect((err as Error).message).toMatch(/'job:sync'.*time limit/)
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'A', 'ROLLBACK'])
  })

  it('an external signal aborts the waiting checkout', async () => {
    const { driver, scope } = make(new FakeDriver(1))
    const hold = scope.run(async () => {
      await q(scope, driver, 'hold')
      await new Promise((r) => setTimeout(r, 50))
    })
    const ac = new AbortController()
    const waiting = scope.run(async () => q(scope, driver, 'wait'), { signal: ac.signal })
    setTimeout(() => ac.abort(), 5)
    await expect(waiting).rejects.toBeInstanceOf(ScopeAbortedError)
    await hold
    expect(driver.checkedOut).toBe(0)
  })
})

describe('shutdown', () => {
  it('stats().open counts the scopes open now, ended in any order; close() aborts each one still open', async () => {
    const { scope } = make()
    const opens = Array.from({ length: 5 }, (_, i) => scope.open({ name: `o${i}` }))
    expect(scope.stats().open).toBe(5)
    await opens[2]!.end({ commit: true }) // in the middle
    await opens[4]!.end({ commit: true }) // the newest
    await opens[0]!.end({ commit: true }) // the oldest
    await opens[0]!.end({ commit: true }) // twice: counted once
    expect(opens[0]!.endNow(true)).toBe(false)
    expect(scope.stats().open).toBe(2)
    await scope.run(async () => {
      expect(scope.stats().open).toBe(3)
    })
    expect(scope.stats().open).toBe(2)
    await scope.close({ timeoutMs: 1 })
    expect([opens[1]!.aborted?.kind, opens[3]!.aborted?.kind]).toEqual(['shutdown', 'shutdown'])
    expect(opens[2]!.aborted).toBeUndefined()
    await opens[3]!.end({ commit: false })
    await opens[1]!.end({ commit: false })
    expect(scope.stats().open).toBe(0)
  })

  it('close() waits for a running job, then ends the driver; new scopes are refused', async () => {
    const { driver, scope } = make()
    let done = false
    const job = scope.runJob(async () => {
      await q(scope, driver, 'A', { ms: 30 })
      done = true
    })
    await new Promise((r) => setTimeout(r, 5))
    await scope.close()
    expect(done).toBe(true)
    expect(driver.ended).toBe(true)
    await job
    await expect(scope.runJob(async () => {})).rejects.toBeInstanceOf(ScopeClosedError)
    expect(() => scope.open()).toThrow(ScopeClosedError)
  })

  it('close({ timeoutMs }) destroys what is still held at the timeout', async () => {
    const { driver, scope } = make()
    const job = scope
      .runJob(async () => {
        await q(scope, driver, 'A')
        await new Promise((r) => setTimeout(r, 60))
        await q(scope, driver, 'B')
      })
      .catch((e: unknown) => e)
    // The job holds its connection (statement A done) before the shutdown starts, however loaded the machine.
    await vi.waitFor(() => expect(driver.checkedOut).toBe(1), { interval: 1 })
    await scope.close({ timeoutMs: 10 })
    expect(driver.releases).toEqual([{ id: 1, destroy: true, busy: 0, status: 'T', marked: false }])
    expect(driver.ended).toBe(true)
    expect(await job).toBeInstanceOf(Error)
  })
})

describe('loop', () => {
  it('runs iterations as jobs, reports and backs off failures, stops after the current iteration', async () => {
    const onError = vi.fn()
    const { driver, scope } = make(new FakeDriver(), { onError })
    const ac = new AbortController()
    let n = 0
    let finished = 0
    await scope.loop(
      async () => {
        n++
        await q(scope, driver, `iter${n}`)
        if (n % 2 === 0) throw new Error(`iteration ${n} failed`)
        if (n === 5) ac.abort()
        await new Promise((r) => setTimeout(r, 5))
        finished++
      },
      { name: 'poll', signal: ac.signal, backoff: { initialMs: 1, maxMs: 2 } },
    )
    expect(n).toBe(5)
    expect(finished).toBe(3) // 1, 3, 5: the aborting iteration still finished
    expect(onError).toHaveBeenCalledTimes(2)
    expect(onError.mock.calls[0]![1].during).toMatch(/loop iteration \(job:poll/)
    expect(scope.stats().totals).toMatchObject({ committed: 3, rolledBack: 2 })
    expect(driver.checkedOut).toBe(0)
  })

  it('requires a signal', async () => {
    const { scope } = make()
    await expect(scope.loop(async () => {}, {} as never)).rejects.toThrow(
      /loop\(fn, \{ signal \}\)/,
    )
  })
})

describe('bad options', () => {
  const driver = new FakeDriver()
  it.each([
    [{ acquireTimeoutMs: -1 }, /acquireTimeoutMs/],
    [{ acquireTimeoutMs: Number.NaN }, /acquireTimeoutMs/],
    [{ acquireTimeoutMs: Number.POSITIVE_INFINITY }, /acquireTimeoutMs/],
    [{ leakDetectionMs: -5 }, /leakDetectionMs/],
    [{ maxHoldMs: '10' }, /maxHoldMs/],
    [{ transaction: 'always' }, /transaction.*'auto' or 'none'/],
    [{ captureStacks: 1 }, /captureStacks/],
    [{ acquireTimout: 5 }, /acquireTimout.*unknown option/],
    [{ name: '' }, /name/],
  ])('%o → TypeError naming the option', (bad, msg) => {
    expect(() => createScope({ driver, default: false, ...(bad as object) })).toThrow(TypeError)
    expect(() => createScope({ driver, default: false, ...(bad as object) })).toThrow(msg)
  })

  it('a driver missing acquire', () => {
    const { acquire: _, ...rest } = Object.fromEntries(
      Object.entries(Object.getOwnPropertyDescriptors(FakeDriver.prototype)).map(([k]) => [
        k,
        () => {},
      ]),
    )
    expect(() => createScope({ driver: { ...rest, name: 'x' } as never, default: false })).toThrow(
      /driver\.acquire must be a function/,
    )
  })

  it("transaction: 'auto' with a driver that cannot begin", () => {
    const driver = { name: 'bare', acquire: async () => ({}), release: () => {} }
    expect(() => createScope({ driver, default: false })).toThrow(
      /has no begin\(\).*transaction: 'none'/,
    )
    expect(() => createScope({ driver, default: false, transaction: 'none' }).close()).not.toThrow()
  })

  it('run() and transaction() options', async () => {
    const { scope } = make()
    await expect(scope.run(async () => {}, { transaction: 'yes' as never })).rejects.toThrow(
      /run\(fn, \{ transaction \}\)/,
    )
    await expect(scope.runJob(async () => {}, { timeoutMs: 0 })).rejects.toThrow(/timeoutMs/)
    await scope.run(async () => {
      await expect(
        scope.getSession().transaction(async () => {}, { retry: { attempts: 0 } }),
      ).rejects.toThrow(/retry: \{ attempts \}/)
    })
    expect(driver.events).toEqual([])
  })
})

describe("release: 'idle' (autocommit, connection back between statements)", () => {
  const idle = (max = 5) => make(new FakeDriver(max), { transaction: 'none', release: 'idle' })

  it('gives the connection back after each statement, and checks one out for the next', async () => {
    const { driver, scope } = idle()
    const outcome = await scope.run(async () => {
      await q(scope, driver, 'A')
      expect(driver.checkedOut).toBe(0)
      expect(scope.getSession().state).toBe('idle')
      await q(scope, driver, 'B')
      expect(driver.checkedOut).toBe(0)
      return scope.getSession()
    })
    expect(driver.events.filter((e) => e === 'acquire')).toHaveLength(2)
    expect(driver.releases.map((r) => r.destroy)).toEqual([false, false])
    expect(scope.stats().totals.acquired).toBe(2)
    // It held connections: its outcome is not 'empty'.
    expect(outcome.outcome).toBe('committed')
  })

  it('concurrent statements share one checkout, given back when the last one ends', async () => {
    const { driver, scope } = idle()
    await scope.run(async () => {
      await Promise.all([
        q(scope, driver, 'A', { ms: 5 }),
        q(scope, driver, 'B', { ms: 1 }),
        q(scope, driver, 'C'),
      ])
    })
    expect(driver.events.filter((e) => e === 'acquire')).toHaveLength(1)
    expect(driver.releases).toEqual([expect.objectContaining({ busy: 0, destroy: false })])
  })

  it('transaction(fn) holds one connection from BEGIN to COMMIT, then gives it back', async () => {
    const { driver, scope } = idle()
    await scope.run(async () => {
      await scope.getSession().transaction(async () => {
        await q(scope, driver, 'A')
        expect(driver.checkedOut).toBe(1)
        await q(scope, driver, 'B')
      })
      expect(driver.checkedOut).toBe(0)
    })
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'A', 'B', 'COMMIT'])
    expect(driver.releases).toHaveLength(1)
  })

  it('connection() hands the connection out untracked, so it is kept to the end', async () => {
    const { driver, scope } = idle()
    await scope.run(async () => {
      const conn = await scope.getSession().connection()
      await q(scope, driver, 'A')
      expect(driver.checkedOut).toBe(1)
      expect(conn.out).toBe(true)
    })
    expect(driver.checkedOut).toBe(0)
    expect(driver.releases).toHaveLength(1)
  })

  it('a connection that failed is destroyed at once; the next statement gets a fresh one', async () => {
    const { driver, scope } = idle()
    const session = await scope.run(async () => {
      await expect(
        q(scope, driver, 'X', { fail: new Error('fatal: connection reset') }),
      ).rejects.toThrow()
      await q(scope, driver, 'Y')
      return scope.getSession()
    })
    expect(driver.releases.map((r) => r.destroy)).toEqual([true, false])
    expect(session.outcome).toBe('destroyed')
  })

  it('with a pool of one, two scopes take turns between statements instead of waiting for the end', async () => {
    const { driver, scope } = idle(1)
    const order: string[] = []
    const job = (name: string) =>
      scope.run(async () => {
        for (const i of [1, 2]) {
          await q(scope, driver, `${name}${i}`, { ms: 2 })
          order.push(`${name}${i}`)
          await new Promise((r) => setTimeout(r, 5))
        }
      })
    await Promise.all([job('a'), job('b')])
    // Interleaved: neither scope kept the only connection while it was not using it.
    expect(order).toEqual(['a1', 'b1', 'a2', 'b2'])
    expect(driver.checkedOut).toBe(0)
  })

  it("is refused where a unit of work holds the connection (transaction: 'auto'), naming the fix", async () => {
    expect(() =>
      createScope({ driver: new FakeDriver(), default: false, release: 'idle' }),
    ).toThrow(/release: 'idle'.*needs transaction: 'none'/)
    expect(() =>
      createScope({ driver: new FakeDriver(), default: false, release: 'soon' as never }),
    ).toThrow(/createScope\(\{ release \}\): expected 'end' or 'idle', got "soon"/)
    const { driver, scope } = make()
    await expect(scope.run(async () => {}, { release: 'idle' })).rejects.toThrow(
      /run\(fn, \{ release: 'idle' \}\): needs transaction: 'none'/,
    )
    expect(driver.events).toEqual([])
    const { driver: d2, scope: none } = make(new FakeDriver(), {
      transaction: 'none',
      release: 'idle',
    })
    // A release: 'idle' scope run as a unit of work keeps its connection to the end.
    await none.run(
      async () => {
        await q(none, d2, 'A')
        expect(d2.checkedOut).toBe(1)
      },
      { transaction: 'auto' },
    )
  })
})

describe('pipelined BEGIN and abort', () => {
  it('a cancel asked for while a pipelined BEGIN is unanswered waits for it (a cancelled BEGIN would leave the statement behind it in autocommit)', async () => {
    const events: string[] = []
    const later = (ms: number, what: string) =>
      new Promise<void>((r) =>
        setTimeout(() => {
          events.push(what)
          r()
        }, ms),
      )
    const driver = {
      name: 'pipelining',
      acquire: async () => ({}),
      release() {},
      begin: () => {
        events.push('BEGIN sent')
        return later(30, 'BEGIN answered')
      },
      commit: async () => {},
      rollback: async () => {
        events.push('ROLLBACK')
      },
      pipelined: () => true,
      cancel: async () => {
        events.push('cancel')
      },
    }
    const scope = createScope({ driver, default: false, leakDetectionMs: 0 })
    scopes.push(scope as never)
    const open = scope.open({ name: 'aborted' })
    await open
      .enter(async () => {
        const statement = scope.getSession().use(async () => {
          events.push('statement sent')
          await later(60, 'statement answered')
        })
        await new Promise((r) => setTimeout(r, 5))
        open.abort('client-abort', { cancel: true })
        await statement
      })
      .catch(() => {})
    await open.end({ commit: false }).catch(() => {})
    expect(events.indexOf('cancel')).toBeGreaterThan(events.indexOf('BEGIN answered'))
    expect(events.slice(0, 2)).toEqual(['BEGIN sent', 'statement sent'])
    expect(events).toContain('ROLLBACK')
  })
})

describe('where a closed session was used from', () => {
  it("with release: 'idle', SessionClosedError shows the session's first statement, not its last checkout", async () => {
    const { driver, scope } = make(new FakeDriver(), {
      transaction: 'none',
      release: 'idle',
      captureStacks: true,
    })
    let kept: ReturnType<typeof scope.getSession> | undefined
    async function firstStatementHere() {
      await q(scope, driver, 'A')
    }
    async function secondStatementHere() {
      await q(scope, driver, 'B')
    }
    await scope.run(async () => {
      kept = scope.getSession()
      await firstStatementHere()
      await secondStatementHere()
    })
    const err = await kept!.use(async () => 1).catch((e: Error) => e)
    expect(err).toBeInstanceOf(SessionClosedError)
    expect((err as Error).message).toMatch(/First statement at:\n[\s\S]*firstStatementHere/)
    expect((err as Error).message).not.toMatch(/secondStatementHere/)
  })

  it('a connection taken by maxHoldMs names the reason, and shows the first statement instead of a timer stack', async () => {
    const { driver, scope } = make(new FakeDriver(), { maxHoldMs: 20, captureStacks: true })
    async function statementHere() {
      await q(scope, driver, 'A')
    }
    const err = await scope
      .run(async () => {
        await statementHere()
        await new Promise((r) => setTimeout(r, 60))
        await q(scope, driver, 'B')
      })
      .catch((e: Error) => e)
    expect((err as Error).message).toMatch(/maxHoldMs/)
    expect((err as Error).message).toMatch(/First statement at:\n[\s\S]*statementHere/)
    expect((err as Error).message).not.toMatch(/Closed at/)
  })
})
