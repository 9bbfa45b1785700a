/**
 * The README's first example runs as written: only the port changes (0 on
 * 127.0.0.1 instead of 3000), and the server is exported so the test can stop it.
 */
import type http from 'node:http'
import type { AddressInfo } from 'node:net'
import { getDefaultScope } from '@scoped/core'
import { expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import { importReadmeExample } from '../../../test/support/readme.ts'

it('the README example answers 201 with a row that is committed', async () => {
  const url = await testDatabase('express_readme')
  let server: http.Server | undefined
  try {
    ;({ server } = await importReadmeExample<{ server: http.Server }>(
      new URL('..', import.meta.url),
      {
        replace: [['app.listen(3000)', "export const server = app.listen(0, '127.0.0.1')"]],
        env: { DATABASE_URL: url },
      },
    ))
    if (!server.listening) await new Promise((r) => server!.once('listening', r))
    const { port } = server.address() as AddressInfo
    const res = await fetch(`http://127.0.0.1:${port}/notes?body=hi`, { method: 'POST' })
    expect(res.status).toBe(201)
    expect(await res.json()).toEqual({ id: 1 })
    expect(await independentQuery(url, 'SELECT id, body FROM notes')).toEqual([
      { id: 1, body: 'hi' },
    ])
  } finally {
    if (server) await new Promise((r) => server!.close(r))
    await getDefaultScope()?.close()
  }
})
