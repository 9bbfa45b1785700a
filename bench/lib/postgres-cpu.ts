/**
 * CPU time of the PostgreSQL server, from /proc: the postmaster's own and
 * reaped children's time, plus the time of every live child (backends,
 * background workers). Differences between two readings are the server's CPU
 * time in between, whichever backend did the work.
 */
import { readdirSync, readFileSync } from 'node:fs'
import pg from 'pg'

const TICKS_PER_SECOND = 100 // USER_HZ on Linux

function stat(pid: number): { ppid: number; ticks: number; childTicks: number } | undefined {
  try {
    const raw = readFileSync(`/proc/${pid}/stat`, 'utf8')
    // The command may contain spaces and parentheses: the fields start after the last ')'.
    const f = raw.slice(raw.lastIndexOf(')') + 2).split(' ')
    // f[0] is field 3 (state): ppid is field 4, utime 14, stime 15, cutime 16, cstime 17.
    return {
      ppid: Number(f[1]),
      ticks: Number(f[11]) + Number(f[12]),
      childTicks: Number(f[13]) + Number(f[14]),
    }
  } catch {
    return undefined
  }
}

export class PostgresCpu {
  readonly #postmaster: number

  private constructor(postmaster: number) {
    this.#postmaster = postmaster
  }

  /** Find the server behind `url` (it must run on this machine); undefined when /proc cannot tell. */
  static async find(url: string): Promise<PostgresCpu | undefined> {
    const c = new pg.Client({ connectionString: url })
    await c.connect()
    try {
      const { rows } = await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
      const backend = stat(rows[0]!.pid)
      if (!backend) return undefined
      return new PostgresCpu(backend.ppid)
    } finally {
      await c.end()
    }
  }

  /** The server's CPU time so far, in µs. */
  read(): number {
    const master = stat(this.#postmaster)
    if (!master) return Number.NaN
    let ticks = master.ticks + master.childTicks
    for (const name of readdirSync('/proc')) {
      const pid = Number(name)
      if (!Number.isInteger(pid)) continue
      const s = stat(pid)
      if (s && s.ppid === this.#postmaster) ticks += s.ticks
    }
    return (ticks * 1e6) / TICKS_PER_SECOND
  }
}
