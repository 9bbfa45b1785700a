/**
 * The MikroORM driver: each session is a forked EntityManager (its own
 * identity map) bound to one connection checked out of MikroORM's knex pool.
 */

import { TransactionEventBroadcaster } from '@mikro-orm/core'
import type { EntityManager, MikroORM } from '@mikro-orm/postgresql'
import type { Driver, PoolStats, SessionInfo, TxOptions } from '@scoped/core'
import { SessionClosedError, TransactionStateError } from '@scoped/core'
import { CancelGuard, type CancellableClient, isFatalPgError, isRetryablePgError } from '@scoped/pg'

/** The raw pg client knex hands out; `__knex__disposed` is knex's own "never reuse" mark. */
interface RawConnection extends CancellableClient {
  __knex__disposed?: unknown
  end(): Promise<void>
}

/** The parts of knex this driver uses (typed here: MikroORM 6 and knex 3 differ in their exports). */
interface KnexLike {
  transaction(config: Record<string, unknown>): Promise<Transaction>
  client: {
    acquireConnection(): Promise<RawConnection>
    releaseConnection(conn: RawConnection): Promise<void>
    pool?: {
      numUsed(): number
      numFree(): number
      numPendingAcquires(): number
      numPendingCreates(): number
      max: number
    }
  }
}

type Transaction = object

interface Pinned {
  connection: RawConnection
  /** Transaction contexts under the open savepoints, innermost last. */
  parents: Transaction[]
  /** The session, learnt at BEGIN, for the error a kept EntityManager throws. */
  session: SessionInfo | undefined
}

/**
 * The transaction context a released fork keeps: any query or flush through it
 * reads a property of it first (knex's `transacting()`, MikroORM's
 * `transactional()`), and gets SessionClosedError instead of running outside
 * any session on another pool connection.
 */
function closedContext(session: SessionInfo | undefined): Transaction {
  const fail = () => {
    throw new SessionClosedError(
      session ?? { id: '-', name: 'unknown' },
      'a query through its EntityManager',
      'it was closed when its request or job ended, and its EntityManager with it',
      undefined,
    )
  }
  return new Proxy(Object.create(null), { get: fail, has: fail, set: fail })
}

const pinned = new WeakMap<EntityManager, Pinned>()

const isolationLevels = {
  'read committed': 'read committed',
  'repeatable read': 'repeatable read',
  serializable: 'serializable',
} as const

/** knex marked the connection broken (its pg client emitted 'error' or 'end'). */
function throwIfGone(p: Pinned, statement: string): void {
  const gone = p.connection.__knex__disposed
  if (gone === undefined) return
  throw new TransactionStateError(
    `${statement} was not sent: the connection failed before it (${gone instanceof Error ? gone.message : String(gone)}), ` +
      'so PostgreSQL discarded the transaction and nothing was committed. The connection is destroyed, not pooled.',
    { cause: gone },
  )
}

function knexOf(orm: MikroORM): KnexLike {
  return orm.em.getConnection('write').getKnex() as unknown as KnexLike
}

/** @internal The pinned state of a session's EntityManager. */
export function pinnedOf(em: EntityManager): Pinned | undefined {
  return pinned.get(em)
}

/**
 * A `Driver` over a MikroORM instance (`@mikro-orm/postgresql`, v6). A session
 * gets `orm.em.fork()` — its own identity map and unit of work — bound to one
 * connection checked out of MikroORM's pool at the session's first use:
 *
 * - BEGIN is a knex transaction on that connection, set as the fork's
 *   transaction context (MikroORM's transaction events fire);
 * - COMMIT is `em.commit()`: MikroORM flushes the unit of work, then commits;
 * - ROLLBACK is `em.rollback()`;
 * - a nested `transaction(fn)` flushes, then opens MikroORM's nested transaction
 *   (a SAVEPOINT) and makes it the fork's context until `fn` ends;
 * - at release the fork is cleared (`em.clear()`) and the connection goes back
 *   to the pool, or is destroyed when it failed.
 *
 * Use `transaction: 'auto'` (the default): MikroORM runs a statement outside a
 * transaction on a pool connection of its own, not on the session's.
 * `scope.close()` closes the ORM.
 *
 * @example
 * ```ts
 * import { MikroORM } from '@mikro-orm/postgresql'
 * import { createScope } from '@scoped/core'
 * import { currentEntityManager, mikroOrmDriver } from '@scoped/mikro-orm'
 *
 * const orm = await MikroORM.init({ clientUrl: url, entities: [Order] })
 * export const scope = createScope({ driver: mikroOrmDriver(orm) })
 * // in a handler:
 * const em = await currentEntityManager(scope)
 * em.persist(em.create(Order, { total: 10 })) // flushed and committed when the request ends
 * ```
 */
export function mikroOrmDriver(orm: MikroORM): Driver<EntityManager> {
  if (typeof orm !== 'object' || orm === null || typeof (orm as MikroORM).em?.fork !== 'function') {
    throw new TypeError(
      `mikroOrmDriver(orm): expected a MikroORM instance (await MikroORM.init(...)), got ${orm === null ? 'null' : typeof orm}.`,
    )
  }
  const platform = orm.config.getPlatform().constructor.name
  if (!/Postgre/i.test(platform)) {
    throw new TypeError(
      `mikroOrmDriver(orm): the ORM's platform is ${platform}; @scoped/mikro-orm supports PostgreSQL ` +
        '(@mikro-orm/postgresql): its destroy path and error classification are PostgreSQL-specific.',
    )
  }

  const state = (em: EntityManager, call: string): Pinned => {
    const p = pinned.get(em)
    if (!p)
      throw new TypeError(
        `mikroOrmDriver: ${call}() got an EntityManager this driver did not check out.`,
      )
    return p
  }

  // A connection with a cancel in flight goes back to the pool only once the cancel is done: a
  // CancelRequest that lands late would cancel the statement of the connection's next holder.
  const cancels = new CancelGuard<RawConnection>()

  const driver: Driver<EntityManager> = {
    name: 'mikro-orm',
    async acquire() {
      const connection = await knexOf(orm).client.acquireConnection()
      const em = orm.em.fork({ clear: true, useContext: false }) as EntityManager
      pinned.set(em, { connection, parents: [], session: undefined })
      return em
    },
    async release(em, { destroy, error }) {
      const p = state(em, 'release')
      pinned.delete(em)
      // A transaction still open here (a failed COMMIT/ROLLBACK) leaves the connection in an unknown state.
      const open = em.getTransactionContext() !== undefined
      em.clear()
      em.setTransactionContext(closedContext(p.session))
      if (destroy || open || p.connection.__knex__disposed) {
        // knex has no call to destroy one checked-out connection: it drops a connection marked
        // __knex__disposed (its own mark for a broken one) when it validates it at the next
        // checkout. Ending the client now closes the backend at once.
        p.connection.__knex__disposed ??=
          error instanceof Error ? error : new Error('connection destroyed by @scoped/mikro-orm')
        await p.connection.end().catch(() => {})
      }
      const cancelling = cancels.settled(p.connection)
      if (cancelling) await cancelling
      await knexOf(orm).client.releaseConnection(p.connection)
    },
    async begin(em, opts: TxOptions, info: SessionInfo) {
      const p = state(em, 'begin')
      p.session ??= { id: info.id, name: info.name }
      const events = new TransactionEventBroadcaster(em, undefined, { topLevelTransaction: true })
      await events.dispatchEvent('beforeTransactionStart' as never)
      const trx = await knexOf(orm).transaction({
        connection: p.connection,
        ...(opts.isolation && { isolationLevel: isolationLevels[opts.isolation] }),
        ...(opts.readOnly !== undefined && { readOnly: opts.readOnly }),
      })
      em.setTransactionContext(trx)
      await events.dispatchEvent('afterTransactionStart' as never, trx)
    },
    async commit(em) {
      throwIfGone(state(em, 'commit'), 'COMMIT')
      // Flushes the unit of work into the transaction, then COMMIT.
      await em.commit()
    },
    async rollback(em) {
      if (em.getTransactionContext() === undefined) return
      // knex swallows a failed ROLLBACK on a dead connection; say it, so the session destroys it.
      throwIfGone(state(em, 'rollback'), 'ROLLBACK')
      await em.rollback()
    },
    async savepoint(em) {
      const p = state(em, 'savepoint')
      // Changes made before the savepoint belong to the outer transaction, not to the inner one.
      await em.flush()
      const parent = em.getTransactionContext()
      if (!parent)
        throw new TransactionStateError('mikroOrmDriver: savepoint() outside a transaction.')
      const nested = await em.getConnection('write').begin({ ctx: parent })
      p.parents.push(parent)
      em.setTransactionContext(nested)
    },
    async releaseSavepoint(em) {
      const p = state(em, 'releaseSavepoint')
      await em.flush()
      await em.getConnection('write').commit(em.getTransactionContext()!)
      em.setTransactionContext(p.parents.pop())
    },
    async rollbackToSavepoint(em) {
      const p = state(em, 'rollbackToSavepoint')
      try {
        await em.getConnection('write').rollback(em.getTransactionContext()!)
      } finally {
        em.setTransactionContext(p.parents.pop())
        // The stacks were empty at the savepoint (it flushed first): all in them now was
        // persisted or removed inside it, and must not be flushed into the outer transaction.
        const uow = em.getUnitOfWork()
        uow.getPersistStack().clear()
        uow.getRemoveStack().clear()
        uow.clearActionsQueue()
      }
    },
    // A CancelRequest for the session's backend, on a short connection of its own (no pool slot).
    async cancel(em) {
      const p = pinned.get(em)
      if (p) await cancels.cancel(p.connection)
    },
    isFatal(em, error) {
      const p = pinned.get(em)
      return p?.connection.__knex__disposed !== undefined || isFatalPgError(error)
    },
    isRetryable: isRetryablePgError,
    poolStats(): PoolStats {
      const pool = knexOf(orm).client.pool
      if (!pool) throw new Error('no pool yet')
      return {
        total: pool.numUsed() + pool.numFree() + pool.numPendingCreates(),
        idle: pool.numFree(),
        waiting: pool.numPendingAcquires(),
        max: pool.max,
      }
    },
    async end() {
      await orm.close()
    },
  }
  return Object.freeze(driver)
}
