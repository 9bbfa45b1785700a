/**
 * A Kysely connection that runs one statement at a time.
 *
 * A session has one connection and many callers (`Promise.all` in a handler,
 * the global `db` inside a `trx` callback, the core's BEGIN/SAVEPOINT). Most
 * database clients either queue silently with a deprecation warning
 * (node-postgres: "Calling client.query() when the client is already
 * executing a query") or break; so statements queue here, in call order.
 */
import { AsyncResource } from 'node:async_hooks'
import { TransactionStateError } from '@scoped/core'
import { isPgServerError } from '@scoped/pg'
import type { CompiledQuery, DatabaseConnection, QueryResult } from 'kysely'

interface Waiting {
  fn: (raw: DatabaseConnection) => Promise<unknown>
  resolve: (value: unknown) => void
  reject: (error: unknown) => void
}

export class SerialConnection implements DatabaseConnection {
  /** The dialect's own connection, as its Kysely driver handed it out. */
  readonly raw: DatabaseConnection
  /**
   * A statement failed with a server error since the last BEGIN, COMMIT,
   * ROLLBACK or ROLLBACK TO SAVEPOINT. In PostgreSQL that means the
   * transaction is aborted and a COMMIT would silently roll it back.
   */
  failed = false
  /** The backend pid, when the driver learned it (PostgreSQL with a pool). */
  pid: number | undefined
  /** Its pg client is in pipeline mode (node-postgres `pipeline: true`): it keeps the order itself. */
  pipelined = false

  /** A statement (or a stream) is running on the raw connection. */
  #active = false
  /** Statements waiting for it, in call order. */
  #waiting: Waiting[] = []
  #streaming = false

  constructor(raw: DatabaseConnection) {
    this.raw = raw
  }

  /**
   * Run `fn` on the raw connection after every statement queued before it.
   * Everything that touches the connection goes through here, transaction
   * control included.
   */
  run<T>(fn: (raw: DatabaseConnection) => Promise<T>): Promise<T> {
    if (this.#streaming) return Promise.reject(this.#busy())
    return this.#enqueue(fn)
  }

  /**
   * On a pipelined pg client only: send `fn`'s statement now without holding
   * the queue, so the next one goes on the wire right behind it instead of
   * waiting for its answer (pg answers them in order). Used for the unit of
   * work's BEGIN. When something already runs, it queues as `run()` does.
   */
  runAhead<T>(fn: (raw: DatabaseConnection) => Promise<T>): Promise<T> {
    if (!this.pipelined || this.#active || this.#streaming) return this.run(fn)
    let sent: Promise<T>
    try {
      sent = fn(this.raw)
    } catch (e) {
      sent = Promise.reject(e)
    }
    return sent.then(undefined, (error) => {
      if (isPgServerError(error)) this.failed = true
      throw error
    })
  }

  executeQuery<R>(compiledQuery: CompiledQuery): Promise<QueryResult<R>> {
    return this.run((raw) => raw.executeQuery<R>(compiledQuery))
  }

  /**
   * Holds the connection from the first row to the end of the stream: a
   * statement asked for meanwhile fails at once (it would wait for the stream,
   * while the stream's consumer waits for it).
   */
  async *streamQuery<R>(
    compiledQuery: CompiledQuery,
    chunkSize?: number,
  ): AsyncIterableIterator<QueryResult<R>> {
    if (this.#streaming) throw this.#busy()
    let release!: () => void
    const hold = new Promise<void>((resolve) => {
      release = resolve
    })
    let started!: () => void
    const start = new Promise<void>((resolve) => {
      started = resolve
    })
    const slot = this.#enqueue(() => {
      started()
      return hold
    })
    this.#streaming = true
    try {
      await start
      yield* this.raw.streamQuery<R>(compiledQuery, chunkSize)
    } finally {
      this.#streaming = false
      release()
      await slot
    }
  }

  #enqueue<T>(fn: (raw: DatabaseConnection) => Promise<T>): Promise<T> {
    if (!this.#active) {
      this.#active = true
      return this.#start(fn)
    }
    return new Promise<T>((resolve, reject) => {
      // Started later from the previous statement's reaction, in its caller's async context:
      // bound to this caller's, so what reads AsyncLocalStorage when the statement goes out
      // (tracing spans, loggers) sees the right one. Only queued statements pay for it.
      this.#waiting.push({
        fn: AsyncResource.bind(fn),
        resolve: resolve as (value: unknown) => void,
        reject,
      })
    })
  }

  /** Run `fn` now; when it settles, start the next waiting statement. */
  #start<T>(fn: (raw: DatabaseConnection) => Promise<T>): Promise<T> {
    let running: Promise<T>
    try {
      running = fn(this.raw)
    } catch (e) {
      running = Promise.reject(e)
    }
    return running.then(
      (value) => {
        this.#dequeue()
        return value
      },
      (error) => {
        if (isPgServerError(error)) this.failed = true
        this.#dequeue()
        throw error
      },
    )
  }

  #dequeue(): void {
    const w = this.#waiting.shift()
    if (!w) {
      this.#active = false
      return
    }
    this.#start(w.fn).then(w.resolve, w.reject)
  }

  #busy(): Error {
    return new TransactionStateError(
      "A statement was sent to a session's connection while a stream() on it is still open: the " +
        'connection is busy until the stream ends, and the statement would wait for the stream while ' +
        "the stream's consumer waits for the statement. Fix: finish (or break out of) the " +
        '`for await` loop first, collect the rows with execute() instead, or run the other work in ' +
        'its own scope (runJob).',
    )
  }
}
