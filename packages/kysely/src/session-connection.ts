/**
 * The connection `scopedKysely` hands Kysely inside a scope: a handle on the
 * current session, not a pooled connection. Statements run through
 * `session.use()` (checked out lazily, inside the unit of work), and Kysely's
 * BEGIN/COMMIT/ROLLBACK become `session.transaction()`: the outermost
 * transaction, or a savepoint of the one already open.
 */
import type { Session, TxOptions } from '@scoped/core'
import { TransactionStateError } from '@scoped/core'
import type {
  CompiledQuery,
  DatabaseConnection,
  Log,
  QueryCompiler,
  QueryResult,
  TransactionSettings,
} from 'kysely'
import type { KyselyDriver } from './kysely-driver.js'
import { logged, loggedStream } from './query-log.js'
import type { RoutedConnection } from './routed-connection.js'

/** Thrown into the transaction's callback to make the core roll it back (Kysely called rollback). */
class RollbackRequest extends Error {
  constructor() {
    super('rolled back by Kysely (rollbackTransaction)')
  }
}

interface OpenTransaction {
  end(commit: boolean): void
  done: Promise<unknown>
  marker: RollbackRequest
}

/**
 * Kysely transactions open in each session, in the order they began. They are
 * savepoints on one connection, so they must end in reverse order.
 */
const openIn = new WeakMap<Session<DatabaseConnection>, OpenTransaction[]>()

export class SessionConnection implements RoutedConnection {
  readonly session: Session<DatabaseConnection>
  #driver: KyselyDriver
  #log: Log | undefined
  /** Kysely opens one transaction per connection; `db.connection()` can open several in turn. */
  #tx: OpenTransaction[] = []

  constructor(session: Session<DatabaseConnection>, driver: KyselyDriver, log: Log | undefined) {
    this.session = session
    this.#driver = driver
    this.#log = log
  }

  executeQuery<R>(compiledQuery: CompiledQuery): Promise<QueryResult<R>> {
    const run = () => this.session.use((conn) => conn.executeQuery<R>(compiledQuery))
    return this.#log ? logged(this.#log, compiledQuery, run) : run()
  }

  streamQuery<R>(
    compiledQuery: CompiledQuery,
    chunkSize?: number,
  ): AsyncIterableIterator<QueryResult<R>> {
    const stream = this.#stream<R>(compiledQuery, chunkSize)
    return this.#log ? loggedStream(this.#log, compiledQuery, stream) : stream
  }

  /** A tracked use for the stream's whole life: the session keeps its connection until it ends. */
  async *#stream<R>(
    compiledQuery: CompiledQuery,
    chunkSize?: number,
  ): AsyncIterableIterator<QueryResult<R>> {
    let release!: () => void
    const hold = new Promise<void>((resolve) => {
      release = resolve
    })
    let got!: (conn: DatabaseConnection) => void
    const ready = new Promise<DatabaseConnection>((resolve) => {
      got = resolve
    })
    const use = this.session.use(async (conn) => {
      got(conn)
      await hold
    })
    try {
      // `use` settles first only when it failed (session closed, checkout failed).
      const conn = (await Promise.race([ready, use])) as DatabaseConnection
      yield* conn.streamQuery<R>(compiledQuery, chunkSize)
    } finally {
      release()
      await use
    }
  }

  /**
   * Kysely's BEGIN: open `session.transaction()` and keep its callback pending
   * until Kysely commits or rolls back. Resolves once BEGIN (or SAVEPOINT) ran.
   */
  async begin(settings: TransactionSettings): Promise<void> {
    const opts = toTxOptions(settings)
    const marker = new RollbackRequest()
    let end!: (commit: boolean) => void
    const outcome = new Promise<void>((resolve, reject) => {
      end = (commit) => (commit ? resolve() : reject(marker))
    })
    let started!: () => void
    const begun = new Promise<void>((resolve) => {
      started = resolve
    })
    const done = this.session.transactionAround(() => {
      started()
      return outcome
    }, opts)
    // Awaited by commit()/rollback(); never an unhandled rejection meanwhile.
    done.catch(() => {})
    // `done` settles first only when BEGIN/SAVEPOINT failed.
    await Promise.race([begun, done])
    const tx: OpenTransaction = { end, done, marker }
    this.#tx.push(tx)
    const open = openIn.get(this.session)
    if (open) open.push(tx)
    else openIn.set(this.session, [tx])
  }

  async commit(): Promise<void> {
    const tx = this.#tx.pop()
    if (!tx) {
      throw new TransactionStateError(
        `commit() on session '${this.session.name}': this transaction already ended (a failed COMMIT ends it). Fix: start a new transaction.`,
      )
    }
    this.#ending(tx)
    tx.end(true)
    await tx.done
  }

  async rollback(): Promise<void> {
    const tx = this.#tx.pop()
    // Nothing open: its COMMIT failed and already rolled it back (`catch { trx.rollback() }` after a failed commit).
    if (!tx) return
    this.#ending(tx)
    tx.end(false)
    try {
      await tx.done
    } catch (e) {
      if (e !== tx.marker) throw e
    }
  }

  savepoint(name: string, compileQuery: QueryCompiler['compileQuery']): Promise<void> {
    return this.session.use((conn) => this.#driver.savepoint(conn, name, compileQuery))
  }

  rollbackToSavepoint(name: string, compileQuery: QueryCompiler['compileQuery']): Promise<void> {
    return this.session.use((conn) => this.#driver.rollbackToSavepoint(conn, name, compileQuery))
  }

  releaseSavepoint(name: string, compileQuery: QueryCompiler['compileQuery']): Promise<void> {
    return this.session.use((conn) => this.#driver.releaseSavepoint(conn, name, compileQuery))
  }

  /**
   * Two transactions of one session ran at the same time (`Promise.all` of
   * `db.transaction()` calls): their savepoints interleaved on the one
   * connection, and the core rejects the one that ends out of order. Nothing
   * of such a unit of work can be trusted, so it will roll back.
   */
  #ending(tx: OpenTransaction): void {
    const open = openIn.get(this.session)
    if (!open) return
    const i = open.lastIndexOf(tx)
    if (i === -1) return
    if (i !== open.length - 1) {
      try {
        this.session.setRollbackOnly()
      } catch {
        // closed or aborted: it rolls back anyway
      }
    }
    open.splice(i, 1)
  }

  /** The session owns the connection and releases it when its scope ends; nothing to do here. */
  release(): Promise<void> {
    return Promise.resolve()
  }
}

/** Kysely's transaction settings as core options; the core's three isolation levels only. */
function toTxOptions(settings: TransactionSettings): TxOptions {
  const { isolationLevel, accessMode } = settings
  if (isolationLevel === 'read uncommitted' || isolationLevel === 'snapshot') {
    throw new TypeError(
      `setIsolationLevel('${isolationLevel}') inside a scope: sessions run 'read committed', ` +
        `'repeatable read' or 'serializable' transactions. Fix: use one of those, or run this ` +
        "transaction outside any scope with scopedKysely(scope, { outsideScope: 'pool' }).",
    )
  }
  return {
    ...(isolationLevel !== undefined && { isolation: isolationLevel }),
    ...(accessMode !== undefined && { readOnly: accessMode === 'read only' }),
  }
}
