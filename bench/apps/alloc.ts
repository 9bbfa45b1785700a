/**
 * Bytes allocated per operation, one case per process (suite 1). Run as a
 * bundle under `node --trace-gc-nvp --expose-gc` with stdout to a file: V8
 * prints a line per garbage collection to stdout, whose `allocated=` field is
 * the bytes allocated since the previous one. This process warms the case up
 * (so it runs optimized), then measures windows of N operations, each between
 * two `gc()` calls: `@@alloc start` after the first, `@@alloc end` after the
 * second, so the window's own allocation is exactly what the GC lines between
 * the markers report (the second `gc()` counts the tail). The runner sums
 * them per window (bench/suites/1-scope-overhead.ts).
 *
 * One case per process: on Node 20 AsyncLocalStorage installs its promise
 * hooks the first time one runs, and from then on every promise of the
 * process pays for them, so the plain async call must run where no
 * AsyncLocalStorage ever ran.
 *
 * The driver does nothing (resolved promises), so what is counted is the
 * scope's and the session's own allocation, not a database client's.
 *
 *   node .tmp/bench/alloc.mjs --list                      # the cases, as JSON
 *   node --trace-gc-nvp --expose-gc .tmp/bench/alloc.mjs <case> > trace.log
 */
import { AsyncLocalStorage } from 'node:async_hooks'
import { writeSync } from 'node:fs'
import { createScope, type Driver, type ScopeOptions } from '@scoped/core'

export interface AllocCase {
  id: string
  label: string
  /** A check of the method: its figure is known in advance. */
  check?: true
}

interface Conn {
  q(): Promise<number>
}

const conn: Conn = { q: () => Promise.resolve(1) }
const noop: Driver<Conn> = { name: 'noop', acquire: () => Promise.resolve(conn), release() {} }
const transactional: Driver<Conn> = {
  ...noop,
  begin: () => Promise.resolve(),
  commit: () => Promise.resolve(),
  rollback: () => Promise.resolve(),
}

function scopeOf(driver: Driver<Conn>, options: Partial<ScopeOptions<Conn>> = {}) {
  return createScope({ driver, name: 'alloc', default: false, captureStacks: false, ...options })
}

const oneStatement = (scope: ReturnType<typeof scopeOf>) => () =>
  scope.run(() => scope.getSession().use((c) => c.q()))

/** Each case builds its operation only when chosen: nothing of the others runs in its process. */
const cases: (AllocCase & { sync?: true; make: () => () => unknown })[] = [
  { id: 'empty', label: 'nothing (an empty loop)', check: true, sync: true, make: () => () => {} },
  {
    id: 'promise',
    label: '`Promise.resolve()`, not awaited (one promise)',
    check: true,
    sync: true,
    make: () => () => {
      Promise.resolve()
    },
  },
  {
    id: 'async',
    label: '`await fn()`, fn an async function (no AsyncLocalStorage in the process)',
    make: () => {
      const work = async () => 1
      return () => work()
    },
  },
  {
    id: 'als',
    label: '`als.run({}, fn)` (bare AsyncLocalStorage)',
    make: () => {
      const als = new AsyncLocalStorage<object>()
      return () => als.run({}, async () => 1)
    },
  },
  {
    id: 'run',
    label: '`scope.run(fn)`',
    make: () => {
      const scope = scopeOf(noop, { transaction: 'none' })
      return () => scope.run(async () => 1)
    },
  },
  {
    id: 'session',
    label: '`scope.run(fn)`, fn calls `getSession()`',
    make: () => {
      const scope = scopeOf(noop, { transaction: 'none' })
      return () =>
        scope.run(async () => {
          scope.getSession()
          return 1
        })
    },
  },
  {
    id: 'none',
    label: "one statement, `'none'`: `scope.run(() => getSession().use(…))`",
    make: () => oneStatement(scopeOf(noop, { transaction: 'none' })),
  },
  {
    id: 'none2',
    label: "two statements, `'none'`",
    make: () => {
      const scope = scopeOf(noop, { transaction: 'none' })
      return () =>
        scope.run(async () => {
          const s = scope.getSession()
          await s.use((c) => c.q())
          await s.use((c) => c.q())
        })
    },
  },
  {
    id: 'idle',
    label: "one statement, `'none'`, `release: 'idle'`",
    make: () => oneStatement(scopeOf(noop, { transaction: 'none', release: 'idle' })),
  },
  {
    id: 'auto',
    label: "one statement, `'auto'` (BEGIN / statement / COMMIT)",
    make: () => oneStatement(scopeOf(transactional, { transaction: 'auto' })),
  },
]

// The same loop function runs the warm-up and the windows, and is called
// several times to warm up: a first call only gets on-stack replacement, and
// compiling the function for the next call allocates (~230 KB on Node 20).
function loop(op: () => unknown, n: number): void {
  for (let i = 0; i < n; i++) op()
}

async function loopAwait(op: () => unknown, n: number): Promise<void> {
  for (let i = 0; i < n; i++) await op()
}

async function main(): Promise<void> {
  const which = process.argv[2]
  if (which === '--list') {
    const list: AllocCase[] = cases.map(({ id, label, check }) => ({ id, label, check }))
    writeSync(1, `${JSON.stringify(list)}\n`)
    return
  }
  const c = cases.find((x) => x.id === which)
  const gc = globalThis.gc
  if (!c) throw new Error(`bench/apps/alloc.ts: no case '${which}' (see --list)`)
  if (!gc) throw new Error('bench/apps/alloc.ts: run with --expose-gc')
  const ops = Number(process.env.BENCH_ALLOC_OPS ?? 100_000)
  const windows = Number(process.env.BENCH_ALLOC_WINDOWS ?? 5)
  const warmup = Number(process.env.BENCH_ALLOC_WARMUP ?? 20_000)
  const op = c.make()
  const run = c.sync ? loop : loopAwait
  for (let i = 0; i < 4; i++) await run(op, Math.ceil(warmup / 4))
  for (let w = 0; w < windows; w++) {
    gc()
    // writeSync to fd 1: the same file V8 writes its GC lines to, in order.
    writeSync(1, '@@alloc start\n')
    await run(op, ops)
    gc()
    writeSync(1, '@@alloc end\n')
  }
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
