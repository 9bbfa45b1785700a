/**
 * What goes over a pool's sockets, in order: each statement a client writes
 * (by its first keyword) and each read. For tests that prove statements were
 * pipelined (written back to back, before any answer was read).
 */
import type pg from 'pg'

export function recordWire(pool: pg.Pool, wire: string[]): void {
  pool.on('connect', (client) => {
    const stream = (client as unknown as { connection: { stream: unknown } }).connection.stream as {
      write: (chunk: Buffer, ...rest: unknown[]) => boolean
      on: (e: string, f: () => void) => void
    }
    const write = stream.write.bind(stream)
    stream.write = (chunk: Buffer, ...rest: unknown[]) => {
      const sql = /(BEGIN|begin|COMMIT|commit|ROLLBACK|rollback|INSERT|insert|SELECT|select)/.exec(
        chunk.toString('utf8'),
      )?.[1]
      if (sql) wire.push(`write ${sql.toUpperCase()}`)
      return write(chunk, ...rest)
    }
    stream.on('data', () => wire.push('read'))
  })
}
