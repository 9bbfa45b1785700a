/**
 * Random sequences of session operations against the fake driver, in
 * 'auto', 'none', and 'none' with `release: 'idle'` (a session may then check
 * out and give back several connections). Whatever the sequence and however
 * the scope ends, four things must hold:
 *   1. every checked-out connection is released exactly once;
 *   2. never while a tracked use is still running on it;
 *   3. it is destroyed iff it is dirty (a fatal error, or a transaction left open);
 *   4. after the scope ends, no operation on its session succeeds.
 */
import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { createScope, ScopeAbortedError, type Session, SessionClosedError } from '../src/index.ts'
import { type FakeConn, FakeDriver } from './fake-driver.ts'

type Op =
  | { kind: 'use' }
  | { kind: 'useFail' }
  | { kind: 'useFatal' }
  | { kind: 'background'; ms: number }
  | { kind: 'commit' }
  | { kind: 'rollback' }
  | { kind: 'tx'; inner: Op[]; fail: boolean }
  | { kind: 'rollbackOnly' }
  | { kind: 'hook' }
  | { kind: 'remove' }
  | { kind: 'abort' }

const leaf = fc.oneof(
  { weight: 4, arbitrary: fc.constant<Op>({ kind: 'use' }) },
  { weight: 1, arbitrary: fc.constant<Op>({ kind: 'useFail' }) },
  { weight: 1, arbitrary: fc.constant<Op>({ kind: 'useFatal' }) },
  {
    weight: 2,
    arbitrary: fc.integer({ min: 0, max: 5 }).map<Op>((ms) => ({ kind: 'background', ms })),
  },
  { weight: 1, arbitrary: fc.constant<Op>({ kind: 'commit' }) },
  { weight: 1, arbitrary: fc.constant<Op>({ kind: 'rollback' }) },
  { weight: 1, arbitrary: fc.constant<Op>({ kind: 'rollbackOnly' }) },
  { weight: 1, arbitrary: fc.constant<Op>({ kind: 'hook' }) },
  { weight: 1, arbitrary: fc.constant<Op>({ kind: 'remove' }) },
  { weight: 1, arbitrary: fc.constant<Op>({ kind: 'abort' }) },
)
const op: fc.Arbitrary<Op> = fc.oneof(
  { weight: 5, arbitrary: leaf },
  {
    weight: 1,
    arbitrary: fc
      .record({ inner: fc.array(leaf, { maxLength: 4 }), fail: fc.boolean() })
      .map<Op>((r) => ({ kind: 'tx', ...r })),
  },
)

describe('session lifecycle (property)', () => {
  it('release exactly once, never under a running use, destroy iff dirty, nothing after close', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(op, { maxLength: 12 }),
        fc.boolean(),
        fc.constantFrom(
          { transaction: 'auto', release: 'end' } as const,
          { transaction: 'none', release: 'end' } as const,
          { transaction: 'none', release: 'idle' } as const,
        ),
        async (ops, throwAtEnd, { transaction, release }) => {
          const driver = new FakeDriver(3)
          const errors: unknown[] = []
          const scope = createScope({
            driver,
            transaction,
            release,
            default: false,
            leakDetectionMs: 0,
            onError: (e) => errors.push(e),
          })
          const sessions: Session<FakeConn>[] = []
          const background: Promise<unknown>[] = []
          const open = scope.open({ name: 'prop' })

          const run = async (o: Op): Promise<void> => {
            const s = scope.getSession()
            if (!sessions.includes(s)) sessions.push(s)
            switch (o.kind) {
              case 'use':
                await s.use((c) => driver.query(c, 'q'))
                break
              case 'useFail':
                await s.use((c) => driver.query(c, 'bad', { fail: new Error('syntax error') }))
                break
              case 'useFatal':
                await s.use((c) => {
                  c.marked = true // this checkout saw a fatal error: it must be destroyed
                  return driver.query(c, 'dead', { fail: new Error('fatal: terminated') })
                })
                break
              case 'background':
                background.push(s.use((c) => driver.query(c, 'bg', { ms: o.ms })).catch(() => {}))
                break
              case 'commit':
                await s.commit()
                break
              case 'rollback':
                await s.rollback()
                break
              case 'rollbackOnly':
                s.setRollbackOnly()
                break
              case 'hook':
                s.afterCommit(() => {})
                break
              case 'remove':
                await scope.remove()
                break
              case 'abort':
                open.abort('client-abort')
                break
              case 'tx':
                await s.transaction(async () => {
                  for (const i of o.inner) await run(i).catch(() => {})
                  if (o.fail) throw new Error('tx body failed')
                })
                break
            }
          }

          await open.enter(async () => {
            for (const o of ops) await run(o).catch(() => {})
          })
          await open.end({ commit: !throwAtEnd }).catch(() => {})
          await Promise.all(background)

          // 1. released exactly once (the fake throws on a second release; that error is reported)
          expect(driver.conns.filter((c) => c.out)).toEqual([])
          expect(driver.releases.length).toBe(driver.events.filter((e) => e === 'acquire').length)
          expect(errors.filter((e) => String(e).includes('released twice'))).toEqual([])
          for (const r of driver.releases) {
            // 2. never while a use runs on it
            expect(r.busy).toBe(0)
            // 3. destroyed iff dirty: a fatal error, or a transaction the core left open
            expect(r.destroy).toBe(r.marked)
            if (!r.destroy) expect(r.status).toBe('I')
          }
          // 4. nothing succeeds after close
          for (const s of sessions) {
            expect(s.state).toBe('closed')
            for (const attempt of [
              () => s.use(async () => 1),
              () => s.connection(),
              () => s.transaction(async () => 1),
              () => s.commit(),
              () => s.rollback(),
            ]) {
              const err = await attempt().then(
                () => undefined,
                (e: unknown) => e,
              )
              expect(err instanceof SessionClosedError || err instanceof ScopeAbortedError).toBe(
                true,
              )
            }
            expect(() => s.afterCommit(() => {})).toThrow()
          }
          await scope.close()
        },
      ),
      { numRuns: 300 },
    )
  })
})
