import { execFile } from 'node:child_process'
import { createRequire } from 'node:module'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { describe, expect, it } from 'vitest'

const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc')
const dir = fileURLToPath(new URL('./types/', import.meta.url))
const run = (project: string) =>
  promisify(execFile)(process.execPath, [tsc, '-p', `${dir}${project}`]).then(
    () => '',
    (e: { stdout: string }) => e.stdout,
  )

describe('Register augmentation', () => {
  it('types the top-level getSession() with the registered scope’s connection', async () => {
    expect(await run('tsconfig.json')).toBe('')
  })

  it('rejects a session typed with another connection type', async () => {
    expect(await run('tsconfig.wrong.json')).toMatch(
      /register-wrong\.ts.*Type 'Session<FakeConn>' is not assignable to type 'Session<string>'/s,
    )
  })
})
