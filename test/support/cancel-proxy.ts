/**
 * A TCP proxy in front of PostgreSQL that holds every CancelRequest back for
 * `delayMs` before passing it on: a cancel is then certain to land after the
 * statement it was sent for has ended. For the tests that prove a late cancel
 * never hits the connection's next holder.
 */
import net from 'node:net'

export interface CancelDelayingProxy {
  /** `url` with host and port replaced by the proxy's. */
  url: string
  /** How many CancelRequests came through so far (a test can check that one was sent). */
  readonly cancelRequests: number
  close(): Promise<void>
}

/** CancelRequest: a 16-byte packet whose code is 80877102. */
function isCancelRequest(chunk: Buffer): boolean {
  return chunk.length >= 8 && chunk.readInt32BE(0) === 16 && chunk.readInt32BE(4) === 80877102
}

export async function cancelDelayingProxy(
  url: string,
  delayMs: number,
): Promise<CancelDelayingProxy> {
  const target = new URL(url)
  const sockets = new Set<net.Socket>()
  let cancelRequests = 0
  const proxy = net.createServer((client) => {
    const upstream = net.connect(Number(target.port), target.hostname)
    sockets.add(client)
    client.on('close', () => sockets.delete(client))
    let first = true
    client.on('data', (chunk) => {
      if (first && isCancelRequest(chunk)) {
        cancelRequests++
        setTimeout(() => upstream.write(chunk), delayMs)
      } else upstream.write(chunk)
      first = false
    })
    upstream.on('data', (chunk) => client.write(chunk))
    upstream.on('close', () => client.destroy())
    client.on('close', () => upstream.destroy())
    upstream.on('error', () => {})
    client.on('error', () => {})
  })
  await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', () => resolve()))
  const proxied = new URL(url)
  proxied.hostname = '127.0.0.1'
  proxied.port = String((proxy.address() as net.AddressInfo).port)
  return {
    url: proxied.toString(),
    get cancelRequests() {
      return cancelRequests
    },
    close: async () => {
      for (const socket of sockets) socket.destroy()
      await new Promise<void>((r) => proxy.close(() => r()))
    },
  }
}
