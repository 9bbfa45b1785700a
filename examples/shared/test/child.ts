/**
 * Start an example the way `pnpm start` does (`tsx src/main.ts` in its folder)
 * as a child process, read what it prints, and stop it with a signal.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { createRequire } from 'node:module'
import { fileURLToPath } from 'node:url'

export interface ExampleProcess {
  readonly pid: number
  /** Everything printed so far (stdout and stderr). */
  output(): string
  /** Resolve with the first match of `re` in the output (waiting for it). */
  waitFor(re: RegExp, timeoutMs?: number): Promise<RegExpMatchArray>
  /** Send `signal` and wait for the exit. */
  stop(signal?: NodeJS.Signals): Promise<{ code: number | null; signal: NodeJS.Signals | null }>
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>
}

const examples = fileURLToPath(new URL('../../', import.meta.url))

/** `example`: a folder under examples/, e.g. 'hono-app'. `script`: relative to it. */
export function startExample(
  example: string,
  env: Record<string, string>,
  script = 'src/main.ts',
): ExampleProcess {
  const cwd = `${examples}${example}`
  // The tsx the example's `start` script runs (its own devDependency).
  const tsx = createRequire(`${cwd}/package.json`).resolve('tsx/cli')
  const child: ChildProcess = spawn(process.execPath, [tsx, script], {
    cwd,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let output = ''
  const waiters = new Set<() => void>()
  const onData = (chunk: Buffer) => {
    output += chunk.toString()
    for (const w of waiters) w()
  }
  child.stdout?.on('data', onData)
  child.stderr?.on('data', onData)
  let done = false
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once('exit', (code, signal) => {
      done = true
      for (const w of waiters) w()
      resolve({ code, signal })
    }),
  )
  return {
    pid: child.pid ?? -1,
    output: () => output,
    exited,
    waitFor(re, timeoutMs = 90_000) {
      return new Promise((resolve, reject) => {
        const check = () => {
          const m = re.exec(output)
          if (m) {
            cleanup()
            resolve(m)
          } else if (done) {
            cleanup()
            reject(new Error(`${example} exited before printing ${re}:\n${output}`))
          }
        }
        const timer = setTimeout(() => {
          cleanup()
          reject(new Error(`${example} did not print ${re} within ${timeoutMs} ms:\n${output}`))
        }, timeoutMs)
        const cleanup = () => {
          clearTimeout(timer)
          waiters.delete(check)
        }
        waiters.add(check)
        check()
      })
    },
    async stop(signal = 'SIGTERM') {
      if (!done) child.kill(signal)
      return exited
    },
  }
}
