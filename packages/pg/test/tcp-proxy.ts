/**
 * A TCP proxy in front of PostgreSQL that can break its connections the way a
 * network does: `silentlyKillAll()` closes the server side and leaves the
 * client side open and quiet, so the client does not notice until it writes
 * (as after a NAT timeout or a failover behind a load balancer). A client
 * that then writes gets its socket reset.
 */
import net from 'node:net'

export interface TcpProxy {
  url: string
  /** Cut every current connection on the server side; the clients are not told. */
  silentlyKillAll(): Promise<void>
  close(): Promise<void>
}

export async function startTcpProxy(databaseUrl: string): Promise<TcpProxy> {
  const target = new URL(databaseUrl)
  const pairs = new Set<{ client: net.Socket; server: net.Socket; dead: boolean }>()
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(target.port), target.hostname)
    const pair = { client, server: upstream, dead: false }
    pairs.add(pair)
    client.on('data', (chunk) => {
      // A dead link: whatever the client sends now is answered with a reset.
      if (pair.dead) client.resetAndDestroy()
      else upstream.write(chunk)
    })
    upstream.on('data', (chunk) => {
      if (!pair.dead) client.write(chunk)
    })
    // The server went away on its own: tell the client, unless the link is meant to be silent.
    upstream.on('close', () => {
      if (!pair.dead) client.destroy()
    })
    upstream.on('error', () => {})
    client.on('close', () => {
      pairs.delete(pair)
      upstream.destroy()
    })
    client.on('error', () => {})
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as net.AddressInfo).port
  const url = new URL(databaseUrl)
  url.hostname = '127.0.0.1'
  url.port = String(port)
  return {
    url: url.toString(),
    async silentlyKillAll() {
      const closed: Promise<void>[] = []
      for (const pair of pairs) {
        pair.dead = true
        closed.push(new Promise((r) => pair.server.once('close', () => r())))
        pair.server.destroy()
      }
      await Promise.all(closed)
    },
    async close() {
      for (const pair of pairs) {
        pair.client.destroy()
        pair.server.destroy()
      }
      await new Promise<void>((resolve) => server.close(() => resolve()))
    },
  }
}
