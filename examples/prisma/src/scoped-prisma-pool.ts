/**
 * The Prisma recipe (docs/prisma.md): a `pg.Pool` for `@prisma/adapter-pg`
 * whose statements run on the current @scoped session's client.
 *
 * Prisma cannot be handed a connection per request: its interactive
 * transactions are callback-only and it owns its pool. But with a driver
 * adapter, every statement Prisma sends goes through `pool.query()` and every
 * transaction through `pool.connect()`. This pool answers both from the
 * current session:
 *
 * - `query()` inside a scope runs on the session's client, in its unit of work;
 * - `connect()` inside a scope (Prisma's `$transaction`, and the implicit
 *   transactions of nested writes) hands Prisma a client whose `BEGIN`,
 *   `COMMIT` and `ROLLBACK` become the session's `transaction()` — a SAVEPOINT
 *   inside the unit of work, a real BEGIN in `transaction: 'none'`;
 * - outside any scope both go to the real pool, as plain Prisma would.
 *
 *   const pool = new pg.Pool({ connectionString })
 *   const scope = createScope({ driver: pgDriver(pool) })
 *   const prisma = new PrismaClient({ adapter: new PrismaPg(new ScopedPrismaPool(scope, pool)) })
 */
import { NoActiveScopeError, type Scope, type Session } from '@scoped/core'
import { serial } from '@scoped/pg'
import pg from 'pg'

type QueryArgs = [config: string | pg.QueryConfig, values?: unknown[]]

function sqlOf(config: string | pg.QueryConfig): string {
  return (typeof config === 'string' ? config : config.text).trim().toUpperCase()
}

function emptyResult(command: string): pg.QueryResult {
  return { command, rowCount: 0, oid: 0, rows: [], fields: [] }
}

/**
 * The current session, or undefined outside any scope. Not `hasSession()`:
 * that is also false in a scope that already ended, where a late statement
 * must fail with SessionClosedError instead of autocommitting on the pool.
 */
function currentSession(scope: Scope<pg.PoolClient>): Session<pg.PoolClient> | undefined {
  try {
    return scope.getSession()
  } catch (e) {
    if (e instanceof NoActiveScopeError) return undefined
    throw e
  }
}

/** Rejects Prisma's transaction on ROLLBACK; never seen by the caller. */
const rolledBack = Symbol('rolled back by Prisma')

/**
 * One Prisma transaction inside a session, as the pg client Prisma's adapter
 * expects. Prisma sends BEGIN, its statements, then COMMIT or ROLLBACK, then
 * calls `release()`. The session's `transaction(fn)` is callback-shaped, so
 * BEGIN starts it with a callback that waits for COMMIT or ROLLBACK.
 */
class SessionTransactionClient {
  readonly #scope: Scope<pg.PoolClient>
  #end: { commit(): void; rollback(): void } | undefined
  #done: Promise<unknown> | undefined

  constructor(scope: Scope<pg.PoolClient>) {
    this.#scope = scope
  }

  async query(...[config, values]: QueryArgs): Promise<pg.QueryResult> {
    const session = this.#scope.getSession()
    const sql = sqlOf(config)
    if (sql === 'BEGIN') {
      let started!: () => void
      const inside = new Promise<void>((r) => {
        started = r
      })
      const ended = new Promise<void>((commit, rollback) => {
        this.#end = { commit: () => commit(), rollback: () => rollback(rolledBack) }
      })
      // BEGIN or SAVEPOINT is sent by the session before the callback runs.
      this.#done = session.transaction(() => {
        started()
        return ended
      })
      await Promise.race([inside, this.#done])
      return emptyResult('BEGIN')
    }
    if (sql === 'COMMIT' || sql === 'ROLLBACK') {
      const end = this.#end
      this.#end = undefined
      if (!end) throw new Error(`${sql} without BEGIN in a Prisma transaction`)
      if (sql === 'COMMIT') end.commit()
      else end.rollback()
      await this.#done!.catch((e) => {
        if (e !== rolledBack) throw e
      })
      return emptyResult(sql)
    }
    return session.use((client) => serial(client, () => client.query(config, values)))
  }

  release(): void {
    // Prisma releases after COMMIT/ROLLBACK; a transaction still open here was abandoned.
    this.#end?.rollback()
    this.#end = undefined
  }

  on(): this {
    return this
  }

  removeListener(): this {
    return this
  }
}

/**
 * A `pg.Pool` to give `new PrismaPg(...)` (it accepts only a `pg.Pool`
 * instance): routed to the current session inside a scope, to `pool` outside.
 * It opens no connection of its own.
 */
export class ScopedPrismaPool extends pg.Pool {
  readonly #scope: Scope<pg.PoolClient>
  readonly #pool: pg.Pool

  constructor(scope: Scope<pg.PoolClient>, pool: pg.Pool) {
    super({ max: 1 })
    this.#scope = scope
    this.#pool = pool
  }

  override query(...args: any[]): any {
    const [config, values] = args as QueryArgs
    let session: Session<pg.PoolClient> | undefined
    try {
      session = currentSession(this.#scope)
    } catch (e) {
      return Promise.reject(e)
    }
    if (!session) return this.#pool.query(config as string, values)
    return session.use((client) => serial(client, () => client.query(config, values)))
  }

  override connect(...args: any[]): any {
    if (args.length > 0)
      throw new TypeError('ScopedPrismaPool.connect(): callbacks are not supported')
    try {
      if (!currentSession(this.#scope)) return this.#pool.connect()
    } catch (e) {
      return Promise.reject(e)
    }
    return Promise.resolve(new SessionTransactionClient(this.#scope) as unknown as pg.PoolClient)
  }

  override end(): Promise<void> {
    // The real pool belongs to the scope's driver: scope.close() ends it.
    return Promise.resolve()
  }
}
