/**
 * Which node-postgres errors kill the connection, and which mean "run the
 * transaction again". By SQLSTATE where the server sent one, by the socket
 * error or pg's own message where it did not.
 */
import { TransactionStateError } from '@scoped/core'

/**
 * Whether PostgreSQL answered a COMMIT with ROLLBACK (the command tag of its
 * result): a statement of the transaction failed and its error was caught, so
 * the transaction was aborted and nothing was committed. Then the error to
 * throw; undefined when the COMMIT committed. For drivers that send COMMIT
 * themselves (pgDriver, @scoped/mikro-orm).
 */
export function commitRefusal(result: unknown): TransactionStateError | undefined {
  if ((result as { command?: unknown } | null | undefined)?.command !== 'ROLLBACK') return undefined
  return new TransactionStateError(
    'COMMIT was turned into ROLLBACK by PostgreSQL: a statement in this transaction failed ' +
      'earlier and its error was caught, so nothing was committed. Fix: let the error propagate, ' +
      'or run the statement that may fail in a nested transaction(fn) (a savepoint) to recover from it.',
  )
}

/** SQLSTATEs after which the backend (or the socket) is gone. */
const fatalStates = new Set([
  '57P01', // admin_shutdown: pg_terminate_backend, server shutdown
  '57P02', // crash_shutdown
  '57P03', // cannot_connect_now
  '57P05', // idle_session_timeout
  '25P03', // idle_in_transaction_session_timeout
  'XX000', // internal_error: not safe to reuse
])

const fatalSocketCodes = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'EPIPE',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ERR_STREAM_DESTROYED',
  'ERR_STREAM_WRITE_AFTER_END',
])

const fatalMessages = [
  'Connection terminated',
  'Client has encountered a connection error and is not queryable',
  'Client was closed and is not queryable',
  'Query read timeout',
]

function codeOf(error: unknown): string | undefined {
  if (typeof error === 'object' && error !== null && 'code' in error) {
    const code = (error as { code: unknown }).code
    return typeof code === 'string' ? code : undefined
  }
  return undefined
}

/** True when the error means the connection must never be reused. */
export function isFatalPgError(error: unknown): boolean {
  const code = codeOf(error)
  if (code !== undefined) {
    if (fatalStates.has(code) || code.startsWith('08')) return true // class 08: connection exception
    if (fatalSocketCodes.has(code)) return true
  }
  const message = error instanceof Error ? error.message : ''
  return fatalMessages.some((m) => message.includes(m))
}

/** True for serialization failures (40001) and deadlocks (40P01): the transaction can simply run again. */
export function isRetryablePgError(error: unknown): boolean {
  const code = codeOf(error)
  return code === '40001' || code === '40P01'
}

/**
 * An error the server sent (it carries a five-character SQLSTATE), not one of
 * the socket or of pg itself. In PostgreSQL such an error aborts the open
 * transaction: its every later statement fails until ROLLBACK (TO SAVEPOINT).
 */
export function isPgServerError(error: unknown): boolean {
  const code = codeOf(error)
  return code !== undefined && /^[0-9A-Z]{5}$/.test(code)
}

/** The error that broke a client's connection (its 'error' event), as pgDriver saw it. */
const lostConnections = new WeakMap<object, Error>()

/** @internal pgDriver: `client` emitted `error` (server restart, terminated backend, network). */
export function noteConnectionLost(client: object, error: Error): void {
  if (!lostConnections.has(client)) lostConnections.set(client, error)
}

/**
 * @internal A statement's error on a client whose connection broke before it:
 * pg says only "Client has encountered a connection error and is not queryable";
 * say what broke it (the server's 57P01, a reset socket), with it as the cause.
 */
export function explainStatementError(client: object, error: unknown): unknown {
  const lost = lostConnections.get(client)
  if (lost === undefined || error === lost) return error
  const what = error instanceof Error ? error.message : String(error)
  return new Error(
    `${what}: its connection failed before this statement (${lost.message}). The unit of work on it is ` +
      'lost and the connection is destroyed, not returned to the pool. Fix: retry the unit of work.',
    { cause: lost },
  )
}
