/**
 * An in-memory driver for the core's unit tests: a bounded pool of fake
 * connections that record every call, with failures on demand. It makes no
 * claim about any real database.
 */
import type { Driver, ReleaseOptions, TxOptions } from '../src/index.ts'

export interface FakeConn {
  id: number
  /** 'I' idle, 'T' in transaction, 'E' failed transaction (as libpq's status). */
  status: 'I' | 'T' | 'E'
  savepoints: string[]
  /** Checked out now. */
  out: boolean
  destroyed: boolean
  /** A use running now (to check release never happens under a running use). */
  busy: number
  /** Set by a test when it makes this checkout dirty; reset at every checkout, recorded at release. */
  marked: boolean
  log: string[]
}

type Op = 'acquire' | 'begin' | 'commit' | 'rollback' | 'savepoint' | 'release'

export class FakeDriver implements Driver<FakeConn> {
  readonly name = 'fake'
  readonly max: number
  readonly conns: FakeConn[] = []
  readonly events: string[] = []
  /** Each release: which connection, destroyed or not, and whether a use was running. */
  readonly releases: {
    id: number
    destroy: boolean
    busy: number
    status: string
    marked: boolean
  }[] = []
  ended = false
  #idle: FakeConn[] = []
  #waiters: ((c: FakeConn) => void)[] = []
  #fail = new Map<Op, unknown>()
  #delay = new Map<Op, number>()

  constructor(max = 5) {
    this.max = max
  }

  /** The next call of `op` throws `error` (once). */
  failNext(op: Op, error: unknown = new Error(`fake ${op} failed`)): void {
    this.#fail.set(op, error)
  }

  /** Calls of `op` take `ms` milliseconds. */
  delay(op: Op, ms: number): void {
    this.#delay.set(op, ms)
  }

  get checkedOut(): number {
    return this.conns.filter((c) => c.out).length
  }

  async #step(op: Op, conn?: FakeConn): Promise<void> {
    const ms = this.#delay.get(op)
    if (ms) await new Promise((r) => setTimeout(r, ms))
    if (this.#fail.has(op)) {
      const e = this.#fail.get(op)
      this.#fail.delete(op)
      if (conn) conn.status = conn.status === 'I' ? 'I' : 'E'
      throw e
    }
  }

  async acquire(signal: AbortSignal): Promise<FakeConn> {
    this.events.push('acquire')
    await this.#step('acquire')
    const conn =
      this.#idle.pop() ??
      (this.conns.filter((c) => !c.destroyed).length < this.max ? this.#make() : undefined)
    if (conn) return this.#checkout(conn)
    return new Promise<FakeConn>((resolve, reject) => {
      const waiter = (c: FakeConn) => resolve(this.#checkout(c))
      this.#waiters.push(waiter)
      signal.addEventListener('abort', () => {
        const i = this.#waiters.indexOf(waiter)
        if (i >= 0) this.#waiters.splice(i, 1)
        reject(signal.reason)
      })
    })
  }

  #make(): FakeConn {
    const c: FakeConn = {
      id: this.conns.length + 1,
      status: 'I',
      savepoints: [],
      out: false,
      destroyed: false,
      busy: 0,
      marked: false,
      log: [],
    }
    this.conns.push(c)
    return c
  }

  #checkout(c: FakeConn): FakeConn {
    if (c.out) throw new Error(`fake: connection ${c.id} checked out twice`)
    c.out = true
    c.marked = false
    return c
  }

  release(conn: FakeConn, { destroy }: ReleaseOptions): void {
    this.events.push(destroy ? 'destroy' : 'release')
    if (!conn.out) throw new Error(`fake: connection ${conn.id} released twice`)
    this.releases.push({
      id: conn.id,
      destroy,
      busy: conn.busy,
      status: conn.status,
      marked: conn.marked,
    })
    conn.out = false
    if (destroy || conn.status !== 'I') {
      conn.destroyed = true
      const fresh = this.#make()
      const w = this.#waiters.shift()
      if (w) w(fresh)
      else this.#idle.push(fresh)
      return
    }
    const w = this.#waiters.shift()
    if (w) w(conn)
    else this.#idle.push(conn)
  }

  async begin(conn: FakeConn, opts: TxOptions): Promise<void> {
    conn.log.push(`BEGIN${opts.isolation ? ` ${opts.isolation}` : ''}`)
    this.events.push('begin')
    if (conn.status !== 'I') throw new Error('fake: BEGIN inside a transaction')
    await this.#step('begin', conn)
    conn.status = 'T'
  }

  async commit(conn: FakeConn): Promise<void> {
    conn.log.push('COMMIT')
    this.events.push('commit')
    await this.#step('commit', conn)
    conn.status = 'I'
    conn.savepoints = []
  }

  async rollback(conn: FakeConn): Promise<void> {
    conn.log.push('ROLLBACK')
    this.events.push('rollback')
    await this.#step('rollback', conn)
    conn.status = 'I'
    conn.savepoints = []
  }

  async savepoint(conn: FakeConn, name: string): Promise<void> {
    conn.log.push(`SAVEPOINT ${name}`)
    await this.#step('savepoint', conn)
    conn.savepoints.push(name)
  }

  async releaseSavepoint(conn: FakeConn, name: string): Promise<void> {
    conn.log.push(`RELEASE ${name}`)
    conn.savepoints.splice(conn.savepoints.lastIndexOf(name))
  }

  async rollbackToSavepoint(conn: FakeConn, name: string): Promise<void> {
    conn.log.push(`ROLLBACK TO ${name}`)
    conn.savepoints.splice(conn.savepoints.lastIndexOf(name))
    if (conn.status === 'E') conn.status = 'T'
  }

  isFatal(_conn: FakeConn, error: unknown): boolean {
    return error instanceof Error && error.message.startsWith('fatal')
  }

  isRetryable(error: unknown): boolean {
    return (error as { code?: string })?.code === '40001'
  }

  poolStats() {
    const total = this.conns.filter((c) => !c.destroyed).length
    const idle = this.#idle.length
    return { total, idle, waiting: this.#waiters.length, max: this.max }
  }

  async end(): Promise<void> {
    this.ended = true
  }

  /** A statement: marks the connection busy while it runs; `fail` puts the transaction in 'E'. */
  async query(
    conn: FakeConn,
    sql: string,
    opts: { ms?: number; fail?: unknown } = {},
  ): Promise<string> {
    if (!conn.out) throw new Error(`fake: query on connection ${conn.id}, which is not checked out`)
    conn.busy++
    try {
      if (opts.ms) await new Promise((r) => setTimeout(r, opts.ms))
      conn.log.push(sql)
      if (opts.fail !== undefined) {
        if (conn.status === 'T') conn.status = 'E'
        throw opts.fail
      }
      if (conn.status === 'E') throw new Error('fake: current transaction is aborted')
      return sql
    } finally {
      conn.busy--
    }
  }
}
