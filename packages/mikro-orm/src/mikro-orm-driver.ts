/**
 * The MikroORM driver: each session is a forked EntityManager (its own
 * identity map) bound to one connection checked out of MikroORM's knex pool.
 */

import { EventType, type TransactionEventType } from '@mikro-orm/core'
import type { EntityManager, MikroORM } from '@mikro-orm/postgresql'
import type { Driver, PoolStats, SessionInfo, TxOptions } from '@scoped/core'
import { SessionClosedError, TransactionStateError } from '@scoped/core'
import {
  CancelGuard,
  type CancellableClient,
  commitRefusal,
  isFatalPgError,
  isRetryablePgError,
} from '@scoped/pg'

/** The raw pg client knex hands out; `__knex__disposed` is knex's own "never reuse" mark. */
interface RawConnection extends CancellableClient {
  __knex__disposed?: unknown
  /** Set by knex on a connection it runs a transaction on (it shows in knex's query events). */
  __knexTxId?: unknown
  query(sql: string): Promise<unknown>
  end(): Promise<void>
}

/** The parts of knex this driver uses (typed here: MikroORM 6 and knex 3 differ in their exports). */
interface KnexLike {
  transaction(config: Record<string, unknown>): Promise<Transaction>
  /** A copy of this knex with its own client (knex's public way to make one). */
  withUserParams(params: unknown): KnexLike
  userParams: unknown
  client: KnexClient
}

interface KnexClient {
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

/** A knex transaction (a knex instance bound to one connection, with its own commit/rollback). */
type Transaction = object & { isCompleted?(): boolean }

/** Per pooled connection, what the driver keeps with it from one session to the next. */
interface Line {
  /** The global EntityManager over MikroORM's driver bound to this connection: sessions fork it. */
  global: EntityManager
  /** A BEGIN not sent yet: it goes out with the transaction's first statement. */
  begin: string | undefined
}

interface Pinned {
  connection: RawConnection
  line: Line
  /** Transaction contexts under the open savepoints, innermost last. */
  parents: Transaction[]
  /** The session, learnt at BEGIN, for the error a kept EntityManager throws. */
  session: SessionInfo | undefined
  /**
   * The entities the fork managed when the outermost transaction began (undefined: none).
   * Those loaded or persisted inside it are forgotten at its ROLLBACK (see rollback).
   */
  managedAtBegin: Set<object> | undefined
}

function closedError(session: SessionInfo | undefined): SessionClosedError {
  return new SessionClosedError(
    session ?? { id: '-', name: 'unknown' },
    'a query through its EntityManager',
    'it was closed when its request or job ended, and its EntityManager with it',
    undefined,
  )
}

/**
 * The transaction context a released fork keeps: any query or flush through it
 * reads a property of it first (knex's `transacting()`, MikroORM's
 * `transactional()`), and gets SessionClosedError instead of running outside
 * any session on another pool connection.
 */
const closedTraps: ProxyHandler<{ session: SessionInfo | undefined }> = {
  get: (t) => {
    throw closedError(t.session)
  },
  has: (t) => {
    throw closedError(t.session)
  },
  set: (t) => {
    throw closedError(t.session)
  },
}

/** The connection a released fork's driver keeps (em.getConnection(), em.getKnex()): its knex throws. */
function closedGetKnex(this: { closedSession: SessionInfo | undefined }): never {
  throw closedError(this.closedSession)
}

type Results = { command?: string }[] | { command?: string }

/** A multi-statement result without its first statement's (the BEGIN sent with it). */
function withoutBegin(r: Results): Results {
  if (!Array.isArray(r)) return r
  return r.length === 2 ? r[1]! : r.slice(1)
}

/**
 * Lets `line.begin` ride with the next statement on `connection` (the pg client
 * knex hands out): a statement sent as one simple query (no bind values, as
 * MikroORM sends its own, parameters inlined) goes as `BEGIN …; <statement>` in
 * one round trip, its result returned without the BEGIN's; any other (bind
 * values, a cursor or stream) gets BEGIN sent just before it on the same
 * connection, which runs them in order. The transaction thus starts where it
 * did, before the first statement, one round trip sooner.
 */
function sendBeginAhead(connection: RawConnection, line: Line): void {
  type Query = (
    this: RawConnection,
    config: unknown,
    values?: unknown,
    callback?: unknown,
  ) => unknown
  const query = connection.query as Query
  const sendAhead: Query = function (
    this: RawConnection,
    config: unknown,
    values?: unknown,
    callback?: unknown,
  ) {
    const begin = line.begin
    if (begin === undefined) return query.call(this, config, values, callback)
    line.begin = undefined
    const done = typeof values === 'function' ? values : callback
    const bound = typeof values === 'function' ? undefined : values
    const c = config as { text?: unknown; values?: unknown[]; name?: unknown; submit?: unknown }
    const text = typeof config === 'string' ? config : c?.text
    const simple =
      typeof text === 'string' &&
      (typeof config === 'string' ||
        (c.submit === undefined && c.name === undefined && !c.values?.length)) &&
      (bound === undefined || (Array.isArray(bound) && bound.length === 0))
    if (!simple) {
      // BEGIN only fails with its connection; mark it so the session destroys it, never commits.
      ;(query.call(this, begin) as Promise<unknown>).catch((e: unknown) => {
        this.__knex__disposed ??= e
      })
      return query.call(this, config, values, callback)
    }
    const both =
      typeof config === 'string' ? `${begin}; ${text}` : { ...c, text: `${begin}; ${text}` }
    if (typeof done === 'function') {
      return query.call(this, both, bound, (err: unknown, r: Results) =>
        (done as (e: unknown, r: unknown) => void)(err, err ? r : withoutBegin(r)),
      )
    }
    return (query.call(this, both, bound) as Promise<Results>).then(withoutBegin)
  }
  connection.query = sendAhead as RawConnection['query']
}

const pinned = new WeakMap<EntityManager, Pinned>()

const isolationLevels = {
  'read committed': 'read committed',
  'repeatable read': 'repeatable read',
  serializable: 'serializable',
} as const

/** The BEGIN statement for `opts` (the isolation level is one of the three above, never user text). */
function beginSql(opts: TxOptions): string {
  const isolation = opts.isolation ? ` ISOLATION LEVEL ${isolationLevels[opts.isolation]}` : ''
  const access = opts.readOnly === undefined ? '' : opts.readOnly ? ' READ ONLY' : ' READ WRITE'
  return `BEGIN${isolation}${access}`
}

/**
 * MikroORM's transaction event `event`, with the arguments em.begin()/em.commit()
 * give it, when a subscriber listens to it (none listen to most: no dispatch then).
 */
async function announce(
  em: EntityManager,
  event: TransactionEventType,
  transaction?: Transaction,
): Promise<void> {
  const events = em.getEventManager()
  for (const s of events.getSubscribers()) {
    if (event in s) {
      await events.dispatchEvent(event, { em, transaction })
      return
    }
  }
}

/**
 * Nothing for a flush to do or to announce: no managed entity, nothing
 * persisted or removed, and no subscriber to the flush events. Then a commit
 * skips MikroORM's flush (which would compute change sets and dispatch
 * beforeFlush/onFlush/afterFlush for nothing).
 */
function nothingToFlush(em: EntityManager): boolean {
  const uow = em.getUnitOfWork()
  if (uow.getPersistStack().size > 0 || uow.getRemoveStack().size > 0) return false
  if (uow.getOrphanRemoveStack().size > 0) return false
  for (const _ of uow.getIdentityMap()) return false
  for (const s of em.getEventManager().getSubscribers()) {
    if ('beforeFlush' in s || 'onFlush' in s || 'afterFlush' in s) return false
  }
  return true
}

/** The entities the fork manages now; undefined when none (the usual BEGIN, at the first statement). */
function managedNow(em: EntityManager): Set<object> | undefined {
  const map = em.getUnitOfWork().getIdentityMap()
  for (const _ of map) return new Set<object>(map)
  return undefined
}

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
 * - BEGIN: the connection's knex transaction (made at its first session, then
 *   kept for it; later sessions send BEGIN on the connection) becomes the
 *   fork's transaction context; MikroORM's transaction events fire;
 * - COMMIT flushes the unit of work, as `em.commit()` does, then commits;
 * - ROLLBACK rolls the whole transaction back and drops pending actions;
 * - a nested `transaction(fn)` flushes, then opens MikroORM's nested transaction
 *   (a SAVEPOINT) and makes it the fork's context until `fn` ends;
 * - at release the fork is cleared (`em.clear()`) and the connection goes back
 *   to the pool, or is destroyed when it failed.
 *
 * The fork runs on the session's connection also outside a transaction: in
 * `transaction: 'none'` its statements are autocommit there, and `em.flush()` /
 * `em.transactional()` send their own BEGIN…COMMIT on it, as MikroORM's
 * `RequestContext` does on a pool connection. `scope.close()` closes the ORM.
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

  // Per pooled connection, the knex transaction made at its first BEGIN, reused as the fork's
  // transaction context by every later session on it: making one per session (a knex instance
  // with its own client, events and promise chain, BEGIN and COMMIT through knex's query path)
  // was most of what a session cost over MikroORM's autocommit read. Later sessions send
  // BEGIN/COMMIT/ROLLBACK on the connection itself; knex never completes this transaction,
  // so the context stays usable (queries, em.getKnex(), savepoints) for the next session.
  const contexts = new WeakMap<RawConnection, Transaction>()

  /** Sends a transaction statement on the session's connection, logged as MikroORM logs its own. */
  const log = (em: EntityManager, sql: string) => {
    if (orm.config.getLogger().isEnabled('query')) {
      ;(em.getConnection('write') as unknown as { logQuery(sql: string): void }).logQuery(sql)
    }
  }

  /** COMMIT or ROLLBACK on the session's connection; none when its BEGIN never went out. */
  const end = async (em: EntityManager, p: Pinned, sql: 'COMMIT' | 'ROLLBACK') => {
    if (p.line.begin !== undefined) {
      p.line.begin = undefined
      return
    }
    const result = await p.connection.query(sql)
    log(em, sql)
    // A statement failed and the handler caught its error: PostgreSQL answers COMMIT with ROLLBACK.
    if (sql === 'COMMIT') {
      const refused = commitRefusal(result)
      if (refused) throw refused
    }
  }

  /** At COMMIT/ROLLBACK: a savepoint still open (a release that failed) would stall the next one's; start afresh. */
  const endOfContext = (p: Pinned) => {
    if (p.parents.length === 0) return
    contexts.delete(p.connection)
    p.parents.length = 0
  }

  // Per pooled connection, MikroORM's driver seen through that one connection: its knex hands out
  // only this connection and never returns it to the pool. A session's fork is made over it, so
  // what runs outside a transaction context — every statement in 'none' mode, em.flush()'s and
  // em.transactional()'s own BEGIN…COMMIT — runs on the session's connection, as in MikroORM's
  // RequestContext it would on a pool connection. Kept with it: the global EntityManager seen
  // over that driver, which sessions fork from (made once, not per session).
  const lines = new WeakMap<RawConnection, Line>()
  const lineOf = (connection: RawConnection): Line => {
    let line = lines.get(connection)
    if (line === undefined) {
      const shared = orm.em.getDriver()
      const knex = knexOf(orm)
      const client: KnexClient = Object.create(knex.client)
      client.acquireConnection = () => Promise.resolve(connection)
      client.releaseConnection = () => Promise.resolve()
      const own = knex.withUserParams(knex.userParams)
      own.client = client
      const conn = Object.create(shared.getConnection('write'))
      conn.client = own
      const driver = Object.create(shared)
      driver.connection = conn
      driver.replicas = []
      const global = Object.create(orm.em) as EntityManager
      ;(global as unknown as { driver: unknown }).driver = driver
      line = { global, begin: undefined }
      sendBeginAhead(connection, line)
      lines.set(connection, line)
    }
    return line
  }

  const driver: Driver<EntityManager> = {
    name: 'mikro-orm',
    async acquire() {
      const connection = await knexOf(orm).client.acquireConnection()
      // A fork of the EntityManager in context (the global one, or a RequestContext's), as
      // em.fork() makes it, but over the driver bound to this connection.
      const line = lineOf(connection)
      const context = orm.em.getContext(false)
      const from =
        context === orm.em
          ? line.global
          : (Object.create(context, {
              driver: { value: line.global.getDriver() },
            }) as EntityManager)
      const em = from.fork({
        clear: true,
        useContext: false,
        disableContextResolution: true,
      }) as EntityManager
      pinned.set(em, {
        connection,
        line,
        parents: [],
        session: undefined,
        managedAtBegin: undefined,
      })
      return em
    },
    async release(em, { destroy, error }) {
      const p = state(em, 'release')
      pinned.delete(em)
      // Never carried to the connection's next holder.
      p.line.begin = undefined
      // A transaction still open here (a failed COMMIT/ROLLBACK) leaves the connection in an unknown state.
      const open = em.getTransactionContext() !== undefined
      em.clear()
      em.setTransactionContext(new Proxy({ session: p.session }, closedTraps) as Transaction)
      // Its driver (bound to this connection, which goes back to the pool) is swapped for one
      // whose knex throws: statements sent past the EntityManager's transaction context
      // (em.getConnection().execute(), em.getKnex()) must not run on the connection's next holder.
      const closed = Object.create(orm.em.getDriver())
      closed.connection = Object.create(orm.em.getDriver().getConnection('write'))
      closed.connection.closedSession = p.session
      closed.connection.getKnex = closedGetKnex
      closed.replicas = []
      ;(em as unknown as { driver: unknown }).driver = closed
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
      p.managedAtBegin = managedNow(em)
      await announce(em, EventType.beforeTransactionStart)
      let trx = contexts.get(p.connection)
      if (trx && !trx.isCompleted?.()) {
        // Sent with the transaction's first statement (sendBeginAhead); nothing, if none comes.
        p.line.begin = beginSql(opts)
        log(em, p.line.begin)
      } else {
        trx = await knexOf(orm).transaction({
          connection: p.connection,
          ...(opts.isolation && { isolationLevel: isolationLevels[opts.isolation] }),
          ...(opts.readOnly !== undefined && { readOnly: opts.readOnly }),
        })
        // It stays on the connection after this session; it would show in knex's query events.
        delete p.connection.__knexTxId
        contexts.set(p.connection, trx)
      }
      em.setTransactionContext(trx)
      await announce(em, EventType.afterTransactionStart, trx)
    },
    async commit(em) {
      const p = state(em, 'commit')
      throwIfGone(p, 'COMMIT')
      const trx = em.getTransactionContext()
      // None: someone ended it (em.commit() in the handler); MikroORM's own error says so.
      if (trx === undefined) return em.commit()
      endOfContext(p)
      // The unit of work goes into the transaction first, as em.commit() does.
      if (!nothingToFlush(em)) await em.flush()
      await announce(em, EventType.beforeTransactionCommit, trx)
      await end(em, p, 'COMMIT')
      em.resetTransactionContext()
      await announce(em, EventType.afterTransactionCommit, trx)
    },
    async rollback(em) {
      const trx = em.getTransactionContext()
      if (trx === undefined) return
      const p = state(em, 'rollback')
      // A connection knex marked broken: say so, so the session destroys it.
      throwIfGone(p, 'ROLLBACK')
      endOfContext(p)
      await announce(em, EventType.beforeTransactionRollback, trx)
      await end(em, p, 'ROLLBACK')
      em.resetTransactionContext()
      const uow = em.getUnitOfWork()
      // The unit of work's pending work was the transaction's: dropped with it.
      uow.getPersistStack().clear()
      uow.getRemoveStack().clear()
      uow.clearActionsQueue()
      // What the fork loaded inside the transaction is what the database just undid, or
      // read in a snapshot that is gone: forget it, so the next read (a retried
      // transaction(fn), the next unit of work) reads the rows as they are. Kept, a retry
      // read its failed attempt's entity and committed a lost update. Entities managed
      // before the transaction stay managed (forgetting them would drop, silently, what a
      // retry changes on them); their changes of the failed attempt stay in memory.
      const before = p.managedAtBegin
      p.managedAtBegin = undefined
      for (const entity of [...uow.getIdentityMap()]) {
        if (!before?.has(entity)) uow.unsetIdentity(entity)
      }
      await announce(em, EventType.afterTransactionRollback, trx)
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
