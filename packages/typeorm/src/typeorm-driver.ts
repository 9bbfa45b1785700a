/**
 * The TypeORM driver: one `QueryRunner` per session, so every statement of a
 * request or job runs on one pooled connection, and the session's
 * `EntityManager` is `queryRunner.manager`.
 */
import type { Driver, PoolStats, TxOptions } from '@scoped/core'
import { SessionClosedError, TransactionStateError } from '@scoped/core'
import { CancelGuard, type CancellableClient, isFatalPgError, isRetryablePgError } from '@scoped/pg'
import type { DataSource, QueryRunner } from 'typeorm'
import { rememberDataSource } from './data-sources.js'

/** What this driver reads of the pg client under a Postgres QueryRunner. */
interface PgClientLike extends CancellableClient {
  getTransactionStatus?(): string
  /** pg's own flag: false while a statement runs or its ReadyForQuery has not arrived yet. */
  readyForQuery?: boolean
  query(text: string): Promise<unknown>
  end(): Promise<void>
}

/** TypeORM's Postgres QueryRunner keeps this private; it is what TypeORM itself calls when the client errors. */
interface PostgresQueryRunnerInternals {
  releasePostgresConnection?(err?: Error): Promise<void>
}

const isolationLevels = {
  'read committed': 'READ COMMITTED',
  'repeatable read': 'REPEATABLE READ',
  serializable: 'SERIALIZABLE',
} as const

function pgClient(qr: QueryRunner): PgClientLike | undefined {
  const c = (qr as { databaseConnection?: unknown }).databaseConnection
  return typeof c === 'object' && c !== null ? (c as PgClientLike) : undefined
}

/**
 * The transaction status as of the last statement. pg rejects a failed
 * statement on the server's ErrorResponse, before the ReadyForQuery that
 * carries the new status ('E'); an empty query queues behind that message
 * (PostgreSQL answers it even in an aborted transaction), so the status read
 * after it is current. Only paid in that window.
 */
async function settledStatus(qr: QueryRunner): Promise<string | undefined> {
  const client = pgClient(qr)
  if (typeof client?.getTransactionStatus !== 'function') return undefined
  if (client.readyForQuery === false) await client.query('').catch(() => {})
  return client.getTransactionStatus()
}

/** TypeORM wraps driver errors in QueryFailedError; the SQLSTATE is on `driverError`. */
function driverError(error: unknown): unknown {
  if (typeof error === 'object' && error !== null && 'driverError' in error) {
    return (error as { driverError: unknown }).driverError ?? error
  }
  return error
}

/** A released QueryRunner's query(): what a kept EntityManager sends after its session ended. */
function refusedQuery(): Promise<never> {
  return Promise.reject(
    new SessionClosedError(
      { id: '-', name: 'unknown' },
      'a query through its QueryRunner (the EntityManager of currentManager())',
      'its session released the connection (its request or job ended, or maxHoldMs or a shutdown took it)',
      undefined,
    ),
  )
}

/**
 * A `Driver` over a TypeORM `DataSource` (type `'postgres'`). Each session
 * gets its own `QueryRunner` (`createQueryRunner()` + `connect()`: one pg
 * client checked out of TypeORM's pool); transactions use the runner's own
 * `startTransaction` / `commitTransaction` / `rollbackTransaction`, so
 * TypeORM's transaction subscribers fire and `manager.transaction()` inside a
 * session nests correctly; nested `transaction(fn)` is TypeORM's nested
 * `startTransaction()`, which is a `SAVEPOINT typeorm_<depth>`.
 *
 * `scope.close()` destroys the DataSource (as `pgDriver` ends its pool).
 *
 * @example
 * ```ts
 * import { DataSource } from 'typeorm'
 * import { createScope } from '@scoped/core'
 * import { typeormDriver, scopedManager } from '@scoped/typeorm'
 *
 * const dataSource = await new DataSource({ type: 'postgres', url, entities: [Order] }).initialize()
 * export const scope = createScope({ driver: typeormDriver(dataSource) })
 * export const db = scopedManager(scope)
 * // in a handler: await db.save(Order, { total: 10 })
 * ```
 */
export function typeormDriver(dataSource: DataSource): Driver<QueryRunner> {
  if (
    typeof dataSource !== 'object' ||
    dataSource === null ||
    typeof (dataSource as DataSource).createQueryRunner !== 'function'
  ) {
    throw new TypeError(
      `typeormDriver(dataSource): expected a TypeORM DataSource, got ${dataSource === null ? 'null' : typeof dataSource}.`,
    )
  }
  const type = dataSource.options.type
  if (type !== 'postgres') {
    throw new TypeError(
      `typeormDriver(dataSource): DataSource type '${type}' is not supported; @scoped/typeorm supports 'postgres' ` +
        '(its destroy path and error classification are PostgreSQL-specific). Fix: use a postgres DataSource.',
    )
  }

  // A pg client with a cancel in flight goes back to the pool only once the cancel is done: a
  // CancelRequest that lands late would cancel the statement of the client's next holder.
  const cancels = new CancelGuard<PgClientLike>()

  const driver: Driver<QueryRunner> = {
    name: 'typeorm',
    async acquire() {
      if (!dataSource.isInitialized) {
        throw new TypeError(
          'typeormDriver: the DataSource is not initialized. Fix: await dataSource.initialize() before the first request.',
        )
      }
      const qr = dataSource.createQueryRunner('master')
      try {
        await qr.connect()
      } catch (e) {
        await qr.release().catch(() => {})
        throw e
      }
      return qr
    },
    async release(qr, { destroy, error }) {
      // Before any await: from now on the runner (and the EntityManager over it, from
      // currentManager()) refuses statements. maxHoldMs or a shutdown may take the connection
      // under a running handler, and what it sends next must not run on a connection its
      // session let go of (autocommitted, or on the connection's next holder).
      ;(qr as unknown as { query: unknown }).query = refusedQuery
      const client = pgClient(qr)
      const cancelling = client && cancels.settled(client)
      if (cancelling) await cancelling
      if (qr.isReleased) return // TypeORM already released it: its pg client emitted 'error'
      const status = client?.getTransactionStatus?.()
      // A transaction left open (e.g. started by hand in transaction: 'none') must not reach the next request.
      const dirty = qr.isTransactionActive || (status !== undefined && status !== 'I')
      if (!destroy && !dirty) {
        await qr.release()
        return
      }
      const reason =
        error instanceof Error
          ? error
          : new Error(
              dirty
                ? 'QueryRunner released inside a transaction'
                : 'connection destroyed by @scoped/typeorm',
            )
      const internals = qr as unknown as PostgresQueryRunnerInternals
      if (typeof internals.releasePostgresConnection === 'function') {
        // pg-pool destroys a client released with an error; this is the call TypeORM itself makes
        // when the client errors (QueryRunner.release() has no way to pass one).
        await internals.releasePostgresConnection.call(qr, reason)
        return
      }
      // Fallback: a pg client that is ending is removed, not pooled, by pg-pool on release.
      pgClient(qr)
        ?.end()
        .catch(() => {})
      await qr.release()
    },
    async begin(qr, opts: TxOptions) {
      await qr.startTransaction(opts.isolation ? isolationLevels[opts.isolation] : undefined)
      // Must be the transaction's first statement after SET TRANSACTION ISOLATION LEVEL.
      if (opts.readOnly !== undefined) {
        await qr.query(opts.readOnly ? 'SET TRANSACTION READ ONLY' : 'SET TRANSACTION READ WRITE')
      }
    },
    async commit(qr) {
      if ((await settledStatus(qr)) === 'E') {
        // PostgreSQL would turn COMMIT into ROLLBACK without an error; say so instead.
        await qr.rollbackTransaction()
        throw new TransactionStateError(
          'COMMIT was not sent: a statement in this transaction failed earlier and its error was caught, ' +
            'so PostgreSQL aborted the transaction and nothing was committed. Fix: let the error propagate, ' +
            'or run the statement that may fail in a nested transaction(fn) (a savepoint) to recover from it.',
        )
      }
      await qr.commitTransaction()
    },
    async rollback(qr) {
      if (!qr.isTransactionActive) return // commit() above already rolled back
      await qr.rollbackTransaction()
    },
    // TypeORM nests startTransaction() as SAVEPOINT typeorm_<depth>; the core's savepoints are
    // strictly last-in first-out, so depth matches, and TypeORM's own depth counter stays right.
    async savepoint(qr) {
      await qr.startTransaction()
    },
    async releaseSavepoint(qr) {
      await qr.commitTransaction()
    },
    async rollbackToSavepoint(qr) {
      await qr.rollbackTransaction()
    },
    // A CancelRequest for the runner's backend, on a short connection of its own (no pool slot).
    async cancel(qr) {
      const client = pgClient(qr)
      if (client && !qr.isReleased) await cancels.cancel(client)
    },
    isFatal(qr, error) {
      return qr.isReleased || isFatalPgError(driverError(error))
    },
    isRetryable: (error) => isRetryablePgError(driverError(error)),
    poolStats(): PoolStats {
      const pool = (dataSource.driver as { master?: unknown }).master as
        | {
            totalCount: number
            idleCount: number
            waitingCount: number
            options?: { max?: number }
          }
        | undefined
      // Before initialize() there is no pool; the core shows no figures when this throws.
      if (!pool || typeof pool.totalCount !== 'number') throw new Error('no pool yet')
      return {
        total: pool.totalCount,
        idle: pool.idleCount,
        waiting: pool.waitingCount,
        max: pool.options?.max ?? 10,
      }
    },
    async end() {
      if (dataSource.isInitialized) await dataSource.destroy()
    },
  }
  Object.freeze(driver)
  rememberDataSource(driver, dataSource)
  return driver
}
