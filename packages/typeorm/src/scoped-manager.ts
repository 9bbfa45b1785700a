/**
 * The session's EntityManager, two ways: `currentManager(scope)` gives the
 * real one (`queryRunner.manager`), and `scopedManager(scope)` is one object
 * for module scope whose calls run on whichever session is current.
 */
import type { IsolationLevel, Scope } from '@scoped/core'
import type { EntityManager, EntityTarget, ObjectLiteral, QueryRunner, Repository } from 'typeorm'
import { dataSourceOf } from './data-sources.js'

/** Calls that never touch the database: answered by the DataSource's manager, outside any session. */
const offline = new Set(['create', 'merge', 'hasId', 'getId'])

/** Calls that would escape the session or need a runner synchronously. */
const refused: Record<string, string> = {
  createQueryBuilder: 'const em = await currentManager(scope); em.createQueryBuilder(...)',
  release: 'the session releases its QueryRunner when the request or job ends',
  queryRunner: 'const em = await currentManager(scope); em.queryRunner',
  getTreeRepository: 'const em = await currentManager(scope); em.getTreeRepository(...)',
  getMongoRepository: 'MongoDB is not supported',
  withRepository: 'const em = await currentManager(scope); em.withRepository(...)',
  extend: 'const em = await currentManager(scope); em.getRepository(...).extend(...)',
  manager: 'const em = await currentManager(scope)',
}

const isolations: Record<string, IsolationLevel> = {
  'READ UNCOMMITTED': 'read committed', // PostgreSQL runs READ UNCOMMITTED as READ COMMITTED
  'READ COMMITTED': 'read committed',
  'REPEATABLE READ': 'repeatable read',
  SERIALIZABLE: 'serializable',
}

/** A Repository whose calls run in the current session; see `scopedManager`. */
export type ScopedRepository<E extends ObjectLiteral> = Omit<
  Repository<E>,
  'createQueryBuilder' | 'manager' | 'queryRunner' | 'extend'
>

/** An EntityManager whose calls run in the current session; see `scopedManager`. */
export type ScopedEntityManager = Omit<
  EntityManager,
  | 'createQueryBuilder'
  | 'release'
  | 'queryRunner'
  | 'getRepository'
  | 'getTreeRepository'
  | 'getMongoRepository'
  | 'withRepository'
> & {
  getRepository<E extends ObjectLiteral>(target: EntityTarget<E>): ScopedRepository<E>
}

/**
 * The current session's EntityManager (`queryRunner.manager`): everything
 * TypeORM offers, query builders included, on the session's connection and in
 * its unit of work. Checks the connection out on first use. Like
 * `session.connection()`, the use is not tracked; do not keep the manager past
 * the request or job (its QueryRunner is released then, and TypeORM throws
 * `QueryRunnerAlreadyReleasedError`).
 *
 * @example
 * ```ts
 * const em = await currentManager(scope)
 * const rows = await em.createQueryBuilder(Order, 'o').where('o.total > :min', { min: 10 }).getMany()
 * ```
 */
export async function currentManager(scope: Scope<QueryRunner>): Promise<EntityManager> {
  dataSourceOf(scope, 'currentManager')
  const qr = await scope.getSession().connection()
  return qr.manager
}

/**
 * One EntityManager-shaped object to import anywhere: each call runs on the
 * current session's `queryRunner.manager`, as a tracked use (the session is not
 * closed under it). Outside a scope it throws `NoActiveScopeError`; after the
 * request ended, `SessionClosedError`. `transaction(fn)` is the session's
 * `transaction()`: BEGIN … COMMIT, or a SAVEPOINT when nested. `getRepository`
 * returns a repository routed the same way. Query builders need the runner, so
 * take them from `currentManager(scope)`.
 *
 * @example
 * ```ts
 * export const db = scopedManager(scope)
 * await db.transaction(async (em) => { await em.save(Order, order); await em.save(Line, lines) })
 * const orders = await db.getRepository(Order).findBy({ customerId })
 * ```
 */
export function scopedManager(scope: Scope<QueryRunner>): ScopedEntityManager {
  const dataSource = dataSourceOf(scope, 'scopedManager')
  const base = dataSource.manager
  const routed = (name: string) => {
    const fn = (base as unknown as Record<string, unknown>)[name]
    if (typeof fn !== 'function') return undefined
    return async (...args: unknown[]) =>
      scope
        .getSession()
        .use((qr) =>
          (qr.manager as unknown as Record<string, (...a: unknown[]) => Promise<unknown>>)[name]!(
            ...args,
          ),
        )
  }
  const transaction = async (a: unknown, b?: unknown) => {
    const fn = (typeof a === 'function' ? a : b) as (em: EntityManager) => Promise<unknown>
    if (typeof fn !== 'function') {
      throw new TypeError('scopedManager.transaction(fn): fn must be a function')
    }
    let opts = {}
    if (typeof a === 'string') {
      const isolation = isolations[a]
      if (!isolation) {
        throw new TypeError(
          `scopedManager.transaction(isolationLevel, fn): unknown isolation level ${JSON.stringify(a)}`,
        )
      }
      opts = { isolation }
    }
    const session = scope.getSession()
    // A tracked use, not connection(): under release: 'idle' the connection is kept for fn only.
    return session.transaction(() => session.use((qr) => fn(qr.manager)), opts)
  }
  return new Proxy(Object.create(null), {
    get(_, prop) {
      if (typeof prop !== 'string') return undefined
      if (prop === 'transaction') return transaction
      if (prop === 'connection' || prop === 'dataSource') return dataSource
      if (prop === 'getRepository') {
        return (target: EntityTarget<ObjectLiteral>) =>
          scopedRepository(scope, dataSource.getRepository(target))
      }
      if (prop in refused) throw refusal(`scopedManager.${prop}`, refused[prop]!)
      if (offline.has(prop)) return (base as unknown as Record<string, Function>)[prop]!.bind(base)
      return routed(prop)
    },
  }) as ScopedEntityManager
}

function scopedRepository<E extends ObjectLiteral>(
  scope: Scope<QueryRunner>,
  base: Repository<E>,
): ScopedRepository<E> {
  return new Proxy(Object.create(null), {
    get(_, prop) {
      if (typeof prop !== 'string') return undefined
      if (prop === 'target' || prop === 'metadata') return base[prop]
      if (prop in refused) throw refusal(`scopedManager.getRepository(...).${prop}`, refused[prop]!)
      const fn = (base as unknown as Record<string, unknown>)[prop]
      if (typeof fn !== 'function') return undefined
      if (offline.has(prop)) return (fn as Function).bind(base)
      return async (...args: unknown[]) =>
        scope.getSession().use((qr) => {
          const repo = qr.manager.getRepository(base.target) as unknown as Record<
            string,
            (...a: unknown[]) => Promise<unknown>
          >
          return repo[prop]!(...args)
        })
    },
  }) as ScopedRepository<E>
}

function refusal(call: string, fix: string): TypeError {
  return new TypeError(`${call} is not available on the scoped manager. Fix: ${fix}.`)
}
