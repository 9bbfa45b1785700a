/**
 * An HTTP app of bench/apps/http.ts running in a child process, and the
 * questions the runner asks it over IPC.
 */
import { type ChildProcess, fork } from 'node:child_process'
import type { AppConfig } from '../apps/http.ts'

export interface ServerOptions {
  /** The bundled app (bench/lib/bundle.ts). */
  bundle: string
  /** Which node binary runs it. */
  node: string
  config: AppConfig
  /** Extra node flags, e.g. `--expose-gc`. */
  flags?: string[]
}

export class Server {
  readonly label: string
  readonly port: number
  readonly pid: number
  #child: ChildProcess
  #asked = 0
  #waiting = new Map<number, (m: Record<string, unknown>) => void>()

  private constructor(label: string, child: ChildProcess, port: number) {
    this.label = label
    this.#child = child
    this.port = port
    this.pid = child.pid ?? 0
    child.on('message', (m: Record<string, unknown>) => {
      const id = m.id as number
      const w = this.#waiting.get(id)
      if (w) {
        this.#waiting.delete(id)
        w(m)
      }
    })
  }

  static start(label: string, opts: ServerOptions): Promise<Server> {
    const child = fork(opts.bundle, [], {
      execPath: opts.node,
      // Not the runner's flags (tsx's loader): the bundle is plain JavaScript.
      execArgv: opts.flags ?? [],
      env: { ...process.env, NODE_ENV: 'production', BENCH_APP: JSON.stringify(opts.config) },
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    })
    return new Promise((resolve, reject) => {
      const onExit = (code: number | null) =>
        reject(new Error(`bench server '${label}' exited with ${code} before it listened`))
      child.once('exit', onExit)
      child.once('error', reject)
      child.once('message', (m: { ready?: boolean; port?: number }) => {
        child.off('exit', onExit)
        if (m.ready && m.port) resolve(new Server(label, child, m.port))
        else
          reject(
            new Error(`bench server '${label}': unexpected first message ${JSON.stringify(m)}`),
          )
      })
    })
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`
  }

  ask(cmd: 'cpu' | 'hold-start' | 'hold' | 'heap' | 'check'): Promise<Record<string, unknown>> {
    const id = ++this.#asked
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiting.delete(id)
        reject(new Error(`bench server '${this.label}' did not answer '${cmd}'`))
      }, 30_000)
      this.#waiting.set(id, (m) => {
        clearTimeout(timer)
        resolve(m)
      })
      this.#child.send({ id, cmd })
    })
  }

  /** Process CPU time (user + system) so far, in µs. */
  async cpu(): Promise<number> {
    return (await this.ask('cpu')).cpuUs as number
  }

  async stop(): Promise<void> {
    if (this.#child.exitCode !== null) return
    await new Promise<void>((resolve) => {
      this.#child.once('exit', () => resolve())
      this.#child.kill('SIGTERM')
    })
  }
}
