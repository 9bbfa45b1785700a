/**
 * The worker example (`examples/worker`) as a separate process, as it would
 * run in production: started with DATABASE_URL, stopped with SIGTERM.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'

export interface WorkerProcess {
  readonly name: string
  /** Orders the worker reported as committed (its "processed orders …" lines, logged after COMMIT). */
  readonly processed: number
  /** SIGTERM, then wait for the exit; resolves to the exit code. */
  stop(): Promise<number | null>
  /** Everything it printed. */
  readonly output: string
}

const workerDir = fileURLToPath(new URL('../worker/', import.meta.url))

export async function startWorker(
  databaseUrl: string,
  env: Record<string, string> = {},
): Promise<WorkerProcess> {
  const child: ChildProcess = spawn(
    process.execPath,
    ['--import', import.meta.resolve('tsx'), 'src/main.ts'],
    {
      cwd: workerDir,
      env: { ...process.env, DATABASE_URL: databaseUrl, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  )
  let output = ''
  let processed = 0
  let name = ''
  const exited = new Promise<number | null>((resolve) =>
    child.once('exit', (code) => resolve(code)),
  )
  const started = new Promise<void>((resolve, reject) => {
    const onData = (chunk: Buffer) => {
      const text = chunk.toString()
      output += text
      for (const line of text.split('\n')) {
        const m = /^processed orders (.+)$/.exec(line)
        if (m?.[1]) processed += m[1].split(',').length
        const s = /^(worker-\d+) started/.exec(line)
        if (s?.[1]) {
          name = s[1]
          resolve()
        }
      }
    }
    child.stdout?.on('data', onData)
    child.stderr?.on('data', (chunk: Buffer) => {
      output += chunk.toString()
    })
    void exited.then((code) =>
      reject(new Error(`the worker exited with ${code} before it started:\n${output}`)),
    )
  })
  await started
  return {
    get name() {
      return name
    },
    get processed() {
      return processed
    },
    get output() {
      return output
    },
    async stop() {
      child.kill('SIGTERM')
      return exited
    },
  }
}
