/**
 * Review probes (session 6) of packages/core/README.md's sentences that no
 * earlier test pinned, with the fake driver (none of them is about what a
 * database does): the top-level functions while the default scope closes,
 * runJob's signal, the error codes, a loop whose fn throws synchronously,
 * remove() inside transaction(fn), retry on a savepoint, 'none' mode's
 * afterCommit, and the connection kept after an explicit commit().
 */
import { afterEach, describe, expect, it } from 'vitest'
import {
  createScope,
  getSession,
  hasSession,
  NoActiveScopeError,
  PoolTimeoutError,
  runJob,
  type Scope,
  ScopeAbortedError,
  ScopeClosedError,
  ScopedError,
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

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

function deferred<T = void>() {
  let resolve!: (v: T) => void
  const promise = new Promise<T>((res) => {
    resolve = res
  })
  return { promise, resolve }
}

describe('the default scope while it closes', () => {
  // README: "`scope.close({ timeoutMs })` | Graceful shutdown: refuse new scopes, wait, destroy
  // what remains, end the pool." and "`scope.close()` refuses new scopes (`ScopeClosedError`),
  // waits for the open ones up to `timeoutMs`". A request still running during that wait calls
  // the top-level getSession() of the README's first example.
  // What happens: close() clears the default-scope slot as it begins, so the top-level
  // getSession() inside the job that close() is waiting for throws a plain Error ("there is no
  // default scope. Create one first ..."); the job's last statement never runs and the job
  // rolls back. scope.getSession() on the scope object still works.
  it('top-level getSession() inside a job that close() waits for still returns the job’s session', async () => {
    const driver = new FakeDriver()
    const scope = createScope({ driver, leakDetectionMs: 0, onError: () => {} })
    scopes.push(scope)
    const closing = deferred()
    const job = runJob(
      async () => {
        await getSession().use((c) => driver.query(c as FakeConn, 'INSERT 1'))
        await closing.promise
        await getSession().use((c) => driver.query(c as FakeConn, 'INSERT 2'))
      },
      { name: 'drain' },
    )
    await sleep(5)
    const closed = scope.close({ timeoutMs: 2_000 })
    closing.resolve()
    await expect(job).resolves.toBeUndefined()
    await closed
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'INSERT 1', 'INSERT 2', 'COMMIT'])
  })

  // Same sentence: "refuses new scopes (ScopeClosedError)". What happens: after the default
  // scope closed, the top-level runJob() throws synchronously (it is not even a rejected
  // promise) a plain Error "runJob(): there is no default scope", not ScopeClosedError; a
  // worker that catches ScopeClosedError to stop (as loop() itself does) does not catch it.
  it('top-level runJob() after the default scope closed rejects with ScopeClosedError', async () => {
    const driver = new FakeDriver()
    const scope = createScope({ driver, leakDetectionMs: 0 })
    scopes.push(scope)
    await scope.close()
    let result: Promise<unknown> | undefined
    let thrown: unknown
    try {
      result = runJob(async () => {}, { name: 'late' })
    } catch (e) {
      thrown = e
    }
    expect(thrown).toBeUndefined()
    await expect(result).rejects.toBeInstanceOf(ScopeClosedError)
  })

  // README: "`getSession()` / `scope.getSession()` | The current request's or job's session.
  // Throws `NoActiveScopeError` outside one." What happens once the default scope closed (and
  // so before any createScope()): a plain Error "getSession(): there is no default scope",
  // without the code a caller matches on.
  it('top-level getSession() outside any scope, after the default scope closed, throws NoActiveScopeError', async () => {
    const driver = new FakeDriver()
    const scope = createScope({ driver, leakDetectionMs: 0 })
    scopes.push(scope)
    expect(() => getSession()).toThrow(NoActiveScopeError)
    await scope.close()
    expect(hasSession()).toBe(false)
    expect(() => getSession()).toThrow(NoActiveScopeError)
  })
})

describe('runJob and its signal', () => {
  // README: "a job aborted by its `signal` the same, with kind `'signal'`" (as a timeout: the job
  // rolls back and rejects with ScopeAbortedError).
  it('a signal that fires while fn runs, fn catching the cancelled work and resolving: rejects with kind signal, rolled back', async () => {
    const { driver, scope } = make()
    const ac = new AbortController()
    const err = await scope
      .runJob(
        async () => {
          const s = scope.getSession()
          await s.use((c) => driver.query(c, 'INSERT'))
          setTimeout(() => ac.abort(), 5)
          await new Promise((r) => s.signal.addEventListener('abort', r))
          // fn swallows the abort and returns normally
        },
        { name: 'sig', signal: ac.signal },
      )
      .catch((e) => e)
    expect(err).toBeInstanceOf(ScopeAbortedError)
    expect(err.kind).toBe('signal')
    expect(err.message).toContain("'job:sig'")
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'INSERT', 'ROLLBACK'])
    expect(driver.checkedOut).toBe(0)
  })

  it('a signal aborted before runJob: rejects with kind signal; no statement of fn reaches the driver', async () => {
    const { driver, scope } = make()
    const err = await scope
      .runJob(
        async () => {
          await scope.getSession().use((c) => driver.query(c, 'INSERT'))
        },
        { name: 'pre', signal: AbortSignal.abort() },
      )
      .catch((e) => e)
    expect(err).toBeInstanceOf(ScopeAbortedError)
    expect(err.kind).toBe('signal')
    expect(driver.conns.flatMap((c) => c.log)).not.toContain('INSERT')
    expect(driver.checkedOut).toBe(0)
  })

  // README: "rejects with `ScopeAbortedError` (kind `'timeout'`, what `fn` threw — usually the
  // cancelled statement — as its `cause`)".
  it('timeoutMs: the cause is what fn threw', async () => {
    const { scope } = make()
    const mine = new Error('statement cancelled')
    const err = await scope
      .runJob(
        async () => {
          const s = scope.getSession()
          await new Promise((r) => s.signal.addEventListener('abort', r))
          throw mine
        },
        { name: 't', timeoutMs: 20 },
      )
      .catch((e) => e)
    expect(err).toBeInstanceOf(ScopeAbortedError)
    expect(err.kind).toBe('timeout')
    expect(err.cause).toBe(mine)
  })

  it('fn that throws synchronously (not async): runJob and run reject, they do not throw', async () => {
    const { driver, scope } = make()
    const boom = new Error('sync')
    const sync = (() => {
      throw boom
    }) as unknown as () => Promise<void>
    let thrown: unknown
    let p1: Promise<unknown> | undefined
    let p2: Promise<unknown> | undefined
    try {
      p1 = scope.runJob(sync)
      p2 = scope.run(sync)
    } catch (e) {
      thrown = e
    }
    expect(thrown).toBeUndefined()
    await expect(p1).rejects.toBe(boom)
    await expect(p2).rejects.toBe(boom)
    expect(driver.checkedOut).toBe(0)
  })
})

describe('errors', () => {
  // README: "All extend `ScopedError` and carry a stable `code`: ..."
  it('every error class extends ScopedError with the documented code', () => {
    const cases: [ScopedError, string][] = [
      [new NoActiveScopeError('s', 'getSession()'), 'NO_ACTIVE_SCOPE'],
      [
        new SessionClosedError({ id: '1', name: 'n' }, 'use()', 'ended', undefined),
        'SESSION_CLOSED',
      ],
      [new PoolTimeoutError('s', 'n', 10, undefined, []), 'POOL_TIMEOUT'],
      [new ScopeClosedError('s', 'run()'), 'SCOPE_CLOSED'],
      [new ScopeAbortedError('n', 'shutdown'), 'SCOPE_ABORTED'],
      [new TransactionStateError('x'), 'TRANSACTION_STATE'],
    ]
    for (const [e, code] of cases) {
      expect(e).toBeInstanceOf(ScopedError)
      expect(e).toBeInstanceOf(Error)
      expect(e.code).toBe(code)
      expect(e.name).toBe(e.constructor.name)
    }
  })

  it('scope.run() on a closed scope rejects with ScopeClosedError (SCOPE_CLOSED); open() throws it', async () => {
    const { scope } = make()
    await scope.close()
    const err = await scope.run(async () => {}).catch((e) => e)
    expect(err).toBeInstanceOf(ScopeClosedError)
    expect(err.code).toBe('SCOPE_CLOSED')
    await expect(scope.runJob(async () => {})).rejects.toBeInstanceOf(ScopeClosedError)
    expect(() => scope.open()).toThrow(ScopeClosedError)
  })
})

describe('loop()', () => {
  // README: "a failing iteration is reported and backed off, never kills the loop".
  it('an iteration fn that throws synchronously (a plain function) is reported and backed off; the loop goes on', async () => {
    const reported: unknown[] = []
    const { driver, scope } = make(new FakeDriver(), { onError: (e: unknown) => reported.push(e) })
    const ac = new AbortController()
    let calls = 0
    const done = scope.loop(
      (() => {
        calls++
        if (calls >= 3) ac.abort()
        throw new Error(`sync ${calls}`)
      }) as unknown as () => Promise<void>,
      { signal: ac.signal, backoff: { initialMs: 1, maxMs: 2 } },
    )
    await expect(done).resolves.toBeUndefined()
    expect(calls).toBe(3)
    expect(reported.map((e) => (e as Error).message)).toEqual(['sync 1', 'sync 2', 'sync 3'])
    expect(driver.checkedOut).toBe(0)
  })
})

describe('remove()', () => {
  // README: "Inside `transaction(fn)` it is an error (it would wait for itself)."
  it('inside transaction(fn) rejects with TransactionStateError; the transaction goes on and commits', async () => {
    const { driver, scope } = make()
    let err: unknown
    await scope.run(async () => {
      const s = scope.getSession()
      await s.transaction(async () => {
        await s.use((c) => driver.query(c, 'INSERT'))
        err = await scope.remove().catch((e) => e)
      })
    })
    expect(err).toBeInstanceOf(TransactionStateError)
    expect((err as Error).message).toContain('would wait for itself')
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'INSERT', 'COMMIT'])
    expect(driver.checkedOut).toBe(0)
  })

  // README: "From the moment `remove()` is called, `getSession()` opens a new session".
  it('remove() then getSession() in the same run: a new session whose work commits at the end; the old work rolled back', async () => {
    const { driver, scope } = make()
    const ids: string[] = []
    await scope.run(async () => {
      const a = scope.getSession()
      ids.push(a.id)
      await a.use((c) => driver.query(c, 'INSERT old'))
      await scope.remove()
      const b = scope.getSession()
      ids.push(b.id)
      await b.use((c) => driver.query(c, 'INSERT new'))
    })
    expect(new Set(ids).size).toBe(2)
    const log = driver.conns.flatMap((c) => c.log)
    expect(log).toEqual(['BEGIN', 'INSERT old', 'ROLLBACK', 'BEGIN', 'INSERT new', 'COMMIT'])
    expect(driver.checkedOut).toBe(0)
  })
})

describe('transaction(fn) retry', () => {
  // README: "After the first statement it is a SAVEPOINT, which ... leaves `retry` to the
  // outermost transaction."
  it('a savepoint given retry does not re-run on its own; the outermost transaction re-runs from BEGIN', async () => {
    const { driver, scope } = make()
    let outer = 0
    let inner = 0
    await scope.run(
      async () => {
        const s = scope.getSession()
        await s.transaction(
          async () => {
            outer++
            await s.use((c) => driver.query(c, 'INSERT a'))
            await s.transaction(
              async () => {
                inner++
                if (inner === 1) throw Object.assign(new Error('serialization'), { code: '40001' })
              },
              { retry: { attempts: 3, backoffMs: 0 } },
            )
          },
          { retry: { attempts: 3, backoffMs: 0 } },
        )
      },
      { transaction: 'none' },
    )
    expect({ outer, inner }).toEqual({ outer: 2, inner: 2 })
    expect(driver.checkedOut).toBe(0)
  })
})

describe('hooks', () => {
  // README: "In `'none'` mode outside a transaction, `afterCommit` runs at once (nothing is
  // pending), as Django's `on_commit` does."
  it("'none' mode outside transaction(fn): afterCommit runs at once", async () => {
    const { scope } = make()
    const seen: string[] = []
    await scope.run(
      async () => {
        scope.getSession().afterCommit(() => {
          seen.push('hook')
        })
        seen.push('after afterCommit()')
      },
      { transaction: 'none' },
    )
    expect(seen).toEqual(['hook', 'after afterCommit()'])
  })

  // README: "Hooks are awaited before the scope ends".
  it('an async afterCommit hook is finished before run() resolves', async () => {
    const { driver, scope } = make()
    let finished = false
    await scope.run(async () => {
      const s = scope.getSession()
      await s.use((c) => driver.query(c, 'INSERT'))
      s.afterCommit(async () => {
        await sleep(30)
        finished = true
      })
    })
    expect(finished).toBe(true)
  })
})

describe('explicit commit()', () => {
  // README: "After an explicit `commit()` the next statement begins a new transaction (the
  // connection stays with the session until the scope ends: one connection per request ...)".
  it('keeps the connection: still a holder, still checked out, and the next unit runs on it', async () => {
    const { driver, scope } = make()
    await scope.run(async () => {
      const s = scope.getSession()
      await s.use((c) => driver.query(c, 'INSERT 1'))
      await s.commit()
      expect(driver.checkedOut).toBe(1)
      expect(scope.holders().map((h) => h.name)).toEqual(['run'])
      expect(scope.stats()).toMatchObject({ holding: 1, inTransaction: 0 })
      await s.use((c) => driver.query(c, 'INSERT 2'))
    })
    expect(driver.conns.length).toBe(1)
    expect(driver.conns[0]!.log).toEqual([
      'BEGIN',
      'INSERT 1',
      'COMMIT',
      'BEGIN',
      'INSERT 2',
      'COMMIT',
    ])
    expect(driver.releases.length).toBe(1)
  })
})

describe('remove() not awaited, then the scope ends', () => {
  // README: "`remove()` ... waits for uses still running (the connection is never released
  // under a statement)" and "From the moment `remove()` is called, `getSession()` opens a new
  // session, even while the old one still waits for its uses"; "`scope.close()` ... waits for
  // the open ones up to `timeoutMs` (default 10 s), destroys connections still held".
  // What happens: the run ends with the new session and resolves while the removed session's
  // statement still runs (stats().open is 0, the connection still held); a close() right after
  // does not wait for it: it destroys that connection at once, under the running statement
  // (the driver sees the release with busy: 1), long before its timeoutMs. With pg the
  // statement then fails with a SessionClosedError saying the close "timed out after 5000 ms",
  // which it did not (packages/pg/test/review-s6.test.ts).
  it('close() right after such a run waits for the removed session’s statement instead of destroying its connection under it', async () => {
    const { driver, scope } = make()
    let slow: Promise<unknown> | undefined
    await scope.run(async () => {
      const s = scope.getSession()
      slow = s.use((c) => driver.query(c, 'SLOW', { ms: 100 }))
      await sleep(5)
      void scope.remove()
      await scope.getSession().use((c) => driver.query(c, 'NEW'))
    })
    await scope.close({ timeoutMs: 2_000 })
    await expect(slow).resolves.toBe('SLOW')
    expect(driver.releases.map((r) => r.busy)).toEqual([0, 0])
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'SLOW', 'ROLLBACK'])
  })

  it('the same run without close(): the removed session rolls back and releases once, after its statement', async () => {
    const { driver, scope } = make()
    let slow: Promise<unknown> | undefined
    await scope.run(async () => {
      const s = scope.getSession()
      slow = s.use((c) => driver.query(c, 'SLOW', { ms: 60 }))
      await sleep(5)
      void scope.remove()
      await scope.getSession().use((c) => driver.query(c, 'NEW'))
    })
    await expect(slow).resolves.toBe('SLOW')
    await sleep(20)
    expect(driver.checkedOut).toBe(0)
    expect(driver.releases.map((r) => r.busy)).toEqual([0, 0])
    expect(driver.conns[0]!.log).toEqual(['BEGIN', 'SLOW', 'ROLLBACK'])
    expect(driver.conns[1]!.log).toEqual(['BEGIN', 'NEW', 'COMMIT'])
  })
})

describe('a PoolTimeoutError in the middle of a request', () => {
  // README: "`acquireTimeoutMs` ... waiting for a connection ends in `PoolTimeoutError`". A
  // HikariCP user catches it and tries again in the same request once the pool frees up.
  it('the same session can try again: the next statement checks out, and the unit commits', async () => {
    const driver = new FakeDriver(1)
    const { scope } = make(driver, { acquireTimeoutMs: 50, onError: () => {} })
    let release!: () => void
    const holder = scope.run(async () => {
      await scope.getSession().use((c) => driver.query(c, 'HOLD'))
      await new Promise<void>((r) => {
        release = r
      })
    })
    await sleep(5)
    const results: unknown[] = []
    await scope.run(async () => {
      const s = scope.getSession()
      results.push(await s.use((c) => driver.query(c, 'A')).catch((e) => e))
      release()
      await holder
      results.push(await s.use((c) => driver.query(c, 'B')))
    })
    expect(results[0]).toBeInstanceOf(PoolTimeoutError)
    expect(results[1]).toBe('B')
    expect(driver.conns.flatMap((c) => c.log)).toEqual([
      'BEGIN',
      'HOLD',
      'COMMIT',
      'BEGIN',
      'B',
      'COMMIT',
    ])
    expect(driver.checkedOut).toBe(0)
  })
})

describe('hooks and an explicit commit()', () => {
  // README: "`afterCommit` hooks run after the real COMMIT, in order" — an explicit commit() is
  // one; the hooks of the unit after it follow that unit.
  it('commit() runs the hooks registered before it; a later unit that rolls back runs only its own afterRollback', async () => {
    const { driver, scope } = make()
    const seen: string[] = []
    const err = await scope
      .run(async () => {
        const s = scope.getSession()
        await s.use((c) => driver.query(c, 'A'))
        s.afterCommit(() => {
          seen.push('commit 1')
        })
        s.afterRollback(() => {
          seen.push('rollback 1')
        })
        await s.commit()
        seen.push('commit() returned')
        s.afterCommit(() => {
          seen.push('commit 2')
        })
        s.afterRollback(() => {
          seen.push('rollback 2')
        })
        await s.use((c) => driver.query(c, 'B'))
        throw new Error('second unit fails')
      })
      .catch((e: Error) => e.message)
    expect(err).toBe('second unit fails')
    expect(seen).toEqual(['commit 1', 'commit() returned', 'rollback 2'])
  })
})

describe('createScope options', () => {
  // README: "`default` | `true` | top-level `getSession()`/`runJob()` use this scope; only one
  // default at a time" and "`name` | driver's name | shown in stats, metrics and errors".
  it('a second default scope is refused, naming the first; after the first closes one can be made', async () => {
    const first = createScope({ driver: new FakeDriver(), name: 'first', leakDetectionMs: 0 })
    scopes.push(first)
    expect(() => createScope({ driver: new FakeDriver(), name: 'second' })).toThrow(/'first'/)
    await first.close()
    const second = createScope({ driver: new FakeDriver(), name: 'second', leakDetectionMs: 0 })
    scopes.push(second)
    await expect(runJob(async () => getSession().id)).resolves.toBeTypeOf('string')
    await second.close()
  })

  it("without name, the scope is named after its driver: in stats() and in a PoolTimeoutError's message", async () => {
    const driver = new FakeDriver(1)
    const { scope } = make(driver, { acquireTimeoutMs: 30, onError: () => {} })
    expect(scope.stats().name).toBe('fake')
    let release!: () => void
    const holder = scope.run(async () => {
      await scope.getSession().use((c) => driver.query(c, 'HOLD'))
      await new Promise<void>((r) => {
        release = r
      })
    })
    await sleep(5)
    const err = await scope
      .run(() => scope.getSession().use((c) => driver.query(c, 'A')))
      .catch((e) => e)
    release()
    await holder
    expect(err).toBeInstanceOf(PoolTimeoutError)
    expect(err.message).toContain("pool 'fake'")
  })
})
