/**
 * The session's EntityManager: the fork the driver made for this request or job.
 */

import type { EntityManager } from '@mikro-orm/postgresql'
import { type Scope, TransactionStateError } from '@scoped/core'
import { pinnedOf } from './mikro-orm-driver.js'

/**
 * The current session's EntityManager (a fork of `orm.em`, inside the unit of
 * work). Checks the connection out and begins the transaction on first use.
 * What you `persist()` is flushed and committed when the request or job ends
 * (`em.commit()`); call `em.flush()` yourself to write earlier (e.g. to get
 * generated ids). Like `session.connection()`, the use is not tracked; prefer
 * `scope.getSession().use((em) => ...)` for work the session must wait for, and
 * do not keep the EntityManager past the request (the fork is cleared then).
 *
 * Throws `TransactionStateError` when no transaction is open (a scope with
 * `transaction: 'none'` outside `transaction(fn)`): MikroORM would then run
 * the statements on other pool connections, outside the session.
 *
 * @example
 * ```ts
 * const em = await currentEntityManager(scope)
 * const order = await em.findOneOrFail(Order, id)
 * order.status = 'paid' // flushed and committed at the end of the request
 * ```
 */
export async function currentEntityManager(scope: Scope<EntityManager>): Promise<EntityManager> {
  const session = scope.getSession()
  const em = await session.connection()
  if (!pinnedOf(em)) {
    throw new TypeError(
      'currentEntityManager(scope): expected a scope created with createScope({ driver: mikroOrmDriver(orm) }).',
    )
  }
  if (!session.inTransaction) {
    throw new TransactionStateError(
      `currentEntityManager() in session '${session.name}', which has no open transaction: MikroORM would run ` +
        "its statements on other pool connections, outside the session. Fix: use transaction: 'auto' (the default), " +
        'or call it inside session.transaction(fn).',
    )
  }
  return em
}
