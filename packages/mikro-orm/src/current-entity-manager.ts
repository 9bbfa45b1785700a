/**
 * The session's EntityManager: the fork the driver made for this request or job.
 */

import type { EntityManager } from '@mikro-orm/postgresql'
import type { Scope } from '@scoped/core'
import { pinnedOf } from './mikro-orm-driver.js'

/**
 * The current session's EntityManager (a fork of `orm.em`, on the session's
 * connection). Checks the connection out, and in `transaction: 'auto'` (the
 * default) begins the transaction, on first use: what you `persist()` is then
 * flushed and committed when the request or job ends (`em.commit()`); call
 * `em.flush()` yourself to write earlier (e.g. to get generated ids).
 *
 * In `transaction: 'none'` its statements run in autocommit on the session's
 * connection, as MikroORM's `RequestContext` runs them on a pool connection:
 * `em.flush()` and `em.transactional()` write in a BEGIN…COMMIT of their own,
 * nothing is flushed at the end, and `session.transaction(fn)` opens a
 * transaction the EntityManager joins until `fn` ends.
 *
 * Like `session.connection()`, the use is not tracked; prefer
 * `scope.getSession().use((em) => ...)` for work the session must wait for, and
 * do not keep the EntityManager past the request (the fork is cleared then).
 *
 * @example
 * ```ts
 * const em = await currentEntityManager(scope)
 * const order = await em.findOneOrFail(Order, id)
 * order.status = 'paid' // flushed and committed at the end of the request
 * ```
 */
export async function currentEntityManager(scope: Scope<EntityManager>): Promise<EntityManager> {
  const em = await scope.getSession().connection()
  if (!pinnedOf(em)) {
    throw new TypeError(
      'currentEntityManager(scope): expected a scope created with createScope({ driver: mikroOrmDriver(orm) }).',
    )
  }
  return em
}
