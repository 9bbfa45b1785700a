/**
 * The README's first example runs as written: only the port changes (0 on
 * 127.0.0.1 instead of 3000), and the server is exported so the test can stop it.
 */
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises'
import type http from 'node:http'
import type { AddressInfo } from 'node:net'
import { fileURLToPath } from 'node:url'
import { getDefaultScope } from '@scoped/core'
import { expect, it } from 'vitest'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'

it('the README example answers 201 with a row that is committed', async () => {
  const readme = await readFile(new URL('../README.md', import.meta.url), 'utf8')
  const example = /```ts\n([\s\S]*?)```/.exec(readme)?.[1]
  expect(example).toContain('app.listen(3000)')
  // Inside the package, so 'express' and 'pg' resolve as they would for a user; .tmp is ignored by git.
  const dir = new URL('../.tmp/', import.meta.url)
  await mkdir(dir, { recursive: true })
  const file = new URL('readme-example.ts', dir)
  await writeFile(
    file,
    example!.replace('app.listen(3000)', "export const server = app.listen(0, '127.0.0.1')"),
  )
  const url = await testDatabase('express_readme')
  process.env.DATABASE_URL = url
  let server: http.Server
  try {
    ;({ server } = (await import(fileURLToPath(file))) as { server: http.Server })
  } finally {
    // Loaded: the copy goes, so linters and type checks of the repo never see it.
    await rm(dir, { recursive: true, force: true })
  }
  try {
    if (!server.listening) await new Promise((r) => server.once('listening', r))
    const { port } = server.address() as AddressInfo
    const res = await fetch(`http://127.0.0.1:${port}/notes?body=hi`, { method: 'POST' })
    expect(res.status).toBe(201)
    expect(await res.json()).toEqual({ id: 1 })
    expect(await independentQuery(url, 'SELECT id, body FROM notes')).toEqual([
      { id: 1, body: 'hi' },
    ])
  } finally {
    await new Promise((r) => server.close(r))
    await getDefaultScope()?.close()
  }
})
