/**
 * What every scenario checks afterwards, as a user would:
 *
 * - no connection checked out: every scope ended, nothing held, the pool's
 *   clients all idle, nobody waiting;
 * - PostgreSQL has no backend of the test database `idle in transaction`;
 * - committed units match answered requests, both ways, and no unit is
 *   half-applied (a `begin` row without its `end`, or the reverse).
 */
import type { Scope } from '@scoped/core'
import type pg from 'pg'
import { independentQuery } from '../../support/db.ts'
import { ABORTED, type LoadResult } from './load.ts'

/** Poll until `cond` holds; fail naming `what` after `ms` (a bound, not a measurement). */
export async function until(
  what: string,
  cond: () => boolean | Promise<boolean>,
  ms = 20_000,
): Promise<void> {
  const deadline = Date.now() + ms
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for: ${what}`)
    await new Promise((r) => setTimeout(r, 10))
  }
}

export interface Leaks {
  /** Connections still checked out of the pool. */
  checkedOut: number
  holders: number
  open: number
  waiting: number
  /** Backends of the database left `idle in transaction`. */
  idleInTransaction: number
}

/** Wait for every scope to end, then count what is still held: all of it must be 0. */
export async function leaks(
  url: string,
  scope: Scope<pg.PoolClient>,
  pool: pg.Pool,
): Promise<Leaks> {
  try {
    await until('every scope ended and the pool idle', () => {
      const s = scope.stats()
      return s.open === 0 && s.holding === 0 && pool.totalCount === pool.idleCount
    })
  } catch {
    // Counted below: the numbers say what did not settle.
  }
  const s = scope.stats()
  return {
    checkedOut: pool.totalCount - pool.idleCount,
    holders: scope.holders().length,
    open: s.open,
    waiting: s.waiting + pool.waitingCount,
    idleInTransaction: await idleInTransaction(url),
  }
}

/** Backends of `url`'s database that sit `idle in transaction` (the leak a lost ROLLBACK leaves). */
export async function idleInTransaction(url: string): Promise<number> {
  const rows = await independentQuery<{ n: number }>(
    url,
    "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()",
  )
  return rows[0]!.n
}

export function leakTotal(l: Leaks): number {
  return l.checkedOut + l.holders + l.open + l.waiting + l.idleInTransaction
}

export interface UnitCheck {
  /** Units committed (complete begin/end pairs). */
  committed: number
  /** Requests answered 2xx/4xx (the client read it, or the server sent it after COMMIT and the client had left). */
  answered: number
  /** Of those, the client had already gone: the response was lost in flight after its COMMIT. */
  lostInFlight: number
  /** A committed unit whose request was not answered 2xx/4xx. */
  committedNotAnswered: string[]
  /** A request answered 2xx/4xx whose unit is not committed. */
  answeredNotCommitted: string[]
  /** begin without end, or end without begin. */
  halfApplied: string[]
  /** Committed ids that belong to no request of this load. */
  strangers: string[]
  /** Where the database and the app's afterCommit disagree (with a ledger): lost or phantom commits. */
  ledgerMismatch: string[]
}

/**
 * Compare the committed units of `prefix` with what the requests got.
 * A request counts as answered when its client read a complete 2xx/4xx, or
 * when the client had aborted but the server had committed its unit (seen by
 * the app's afterCommit, with a ledger) or sent a 2xx/4xx status: the adapter
 * commits before it sends, so that response was lost in flight, after its
 * COMMIT. With a ledger, the database and afterCommit must also agree on
 * every unit.
 */
export async function checkUnits(
  url: string,
  load: LoadResult,
  prefix: string,
): Promise<UnitCheck> {
  const rows = await independentQuery<{ id: string; parts: string[] }>(
    url,
    'SELECT id, array_agg(part ORDER BY part) AS parts FROM units WHERE id LIKE $1 GROUP BY id',
    [`${prefix}%`],
  )
  const committed = new Set<string>()
  const halfApplied: string[] = []
  for (const r of rows) {
    if (r.parts.length === 2) committed.add(r.id)
    else halfApplied.push(`${r.id} has only ${r.parts.join(',')}`)
  }
  const out: UnitCheck = {
    committed: committed.size,
    answered: 0,
    lostInFlight: 0,
    committedNotAnswered: [],
    answeredNotCommitted: [],
    halfApplied,
    strangers: [],
    ledgerMismatch: [],
  }
  const seen = new Set<string>()
  for (let i = 0; i < load.sent; i++) {
    const id = load.idOf(i)
    seen.add(id)
    const c = load.client[i]!
    const s = load.server[i]!
    const clientAnswered = c >= 200 && c < 500
    const byServer = load.committedByServer?.[i] === 1
    const lost = c === ABORTED && ((s >= 200 && s < 500) || byServer)
    const answered = clientAnswered || lost
    if (answered) out.answered++
    if (lost) out.lostInFlight++
    const isCommitted = committed.has(id)
    if (load.committedByServer && byServer !== isCommitted) {
      out.ledgerMismatch.push(
        `${id} (${load.kinds[i]}): ${isCommitted ? 'committed in the database, but afterCommit never ran' : 'afterCommit ran, but the database has no unit'}`,
      )
    }
    if (answered && !isCommitted) {
      out.answeredNotCommitted.push(
        `${id} (${load.kinds[i]}): client ${c}, server ${s}, not committed`,
      )
    }
    if (isCommitted && !answered) {
      out.committedNotAnswered.push(
        `${id} (${load.kinds[i]}): client ${c}, server ${s}, but committed`,
      )
    }
  }
  for (const id of committed) if (!seen.has(id)) out.strangers.push(id)
  return out
}

export function unitProblems(u: UnitCheck): string[] {
  return [
    ...u.committedNotAnswered,
    ...u.answeredNotCommitted,
    ...u.halfApplied,
    ...u.ledgerMismatch,
    ...u.strangers.map((s) => `${s}: committed by no request`),
  ]
}

/** Units lost or half-applied: the table's column, which must be 0. */
export function lostCount(u: UnitCheck): number {
  return (
    u.committedNotAnswered.length +
    u.answeredNotCommitted.length +
    u.halfApplied.length +
    u.ledgerMismatch.length +
    u.strangers.length
  )
}
