/**
 * Cancelling the statement a node-postgres client runs, for every driver whose
 * connections are pg clients underneath (pgDriver, kyselyDriver over
 * PostgresDialect, the ORM drivers).
 *
 * No import of `pg`: the client is typed by the few members used here.
 */

/** The members of a pg `Client` that a cancel needs. */
export interface CancellableClient {
  processID?: number | null
  secretKey?: number | null
  host?: string
  port?: number
  connection?: { constructor: new () => CancelConnection }
}

interface CancelConnection {
  connect(portOrPath: number | string, host?: string): void
  cancel(processID: number, secretKey: number): void
  on(event: string, fn: (...args: unknown[]) => void): void
  end?(): void
}

/** A cancel that got no answer in this time is given up (the timer never keeps the process alive). */
const CANCEL_TIMEOUT_MS = 5_000

/**
 * Cancel the statement running on `client` with the protocol's CancelRequest:
 * a short extra connection carrying the backend's pid and secret key. It needs
 * no free pool slot and no authentication. Best effort: resolves when the
 * server closed that connection, on an error, or after 5 s; never rejects.
 */
export function cancelBackend(client: CancellableClient): Promise<void> {
  const { processID, secretKey, connection } = client
  if (typeof processID !== 'number' || typeof secretKey !== 'number' || !connection) {
    return Promise.resolve()
  }
  const Connection = connection.constructor
  return new Promise<void>((resolve) => {
    const con = new Connection()
    const done = () => {
      clearTimeout(timer)
      resolve()
    }
    const timer = setTimeout(() => {
      con.end?.()
      done()
    }, CANCEL_TIMEOUT_MS)
    timer.unref()
    con.on('connect', () => con.cancel(processID, secretKey))
    con.on('end', done)
    con.on('error', done)
    if (client.host?.startsWith('/')) con.connect(`${client.host}/.s.PGSQL.${client.port}`)
    else con.connect(client.port ?? 5432, client.host ?? 'localhost')
  })
}

/**
 * Cancels, and the clients they were sent for. A CancelRequest lands when it
 * lands and cancels whatever the backend runs then: if the statement it was
 * sent for already ended and the client went on to its next holder, it would
 * cancel that holder's statement. So a driver releases a client with a cancel
 * in flight only once the cancel is done: `release` waits for `settled(client)`.
 */
export class CancelGuard<Client extends object = CancellableClient> {
  #inFlight = new WeakMap<Client, Promise<void>>()
  #send: (client: Client) => Promise<void>

  /** @param send how to reach the pg client: default, `client` is one. */
  constructor(send: (client: Client) => Promise<void> = cancelBackend as never) {
    this.#send = send
  }

  /** Send a cancel for `client`'s running statement; resolves when it is done (never rejects). */
  cancel(client: Client): Promise<void> {
    const sent = this.#send(client)
    const previous = this.#inFlight.get(client)
    const all = previous ? Promise.all([previous, sent]).then(() => {}) : sent
    this.#inFlight.set(client, all)
    void all.then(() => {
      if (this.#inFlight.get(client) === all) this.#inFlight.delete(client)
    })
    return sent
  }

  /** The cancels still in flight for `client`, or undefined when there are none (the usual case). */
  settled(client: Client): Promise<void> | undefined {
    return this.#inFlight.get(client)
  }
}
