/**
 * Run a package README's first example as a user would paste it:
 *
 *   const { server } = await importReadmeExample<{ server: http.Server }>(
 *     new URL('..', import.meta.url),
 *     { replace: [['app.listen(3000)', "export const server = app.listen(0, '127.0.0.1')"]] },
 *   )
 *
 * The first ```ts block is written under the package's .tmp/ (ignored by git), so
 * its imports ('express', 'pg', '@scoped/…') resolve as they would for a user, and
 * imported (top-level awaits included). Only the given replacements change it: each
 * must match exactly once, so a README that drifts from its test fails the test.
 */
import { mkdir, readFile, rm, rmdir, writeFile } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import { onTestFinished, vi } from 'vitest'

export interface ReadmeExampleOptions {
  /** `[what the README says, what the test runs instead]`, each found exactly once. */
  replace?: [string, string][]
  /** Appended after the example (ES exports are hoisted: `export { scope }` reaches a const above). */
  append?: string
  /** Environment set before the example runs (it reads it at any time), restored when the test ends. */
  env?: Record<string, string>
}

/** The README's first ```ts block. */
export async function readmeExample(packageDir: URL): Promise<string> {
  const readme = await readFile(new URL('README.md', packageDir), 'utf8')
  const example = /```ts\n([\s\S]*?)```/.exec(readme)?.[1]
  if (example === undefined)
    throw new Error(`${fileURLToPath(packageDir)}README.md has no \`\`\`ts block`)
  return example
}

/** Import the README's first example with `options` applied; resolves once its top level has run. */
export async function importReadmeExample<M = Record<string, unknown>>(
  packageDir: URL,
  options: ReadmeExampleOptions = {},
): Promise<M> {
  let source = await readmeExample(packageDir)
  for (const [from, to] of options.replace ?? []) {
    const count = source.split(from).length - 1
    if (count !== 1) {
      throw new Error(
        `the README example should contain ${JSON.stringify(from)} once, found ${count}`,
      )
    }
    source = source.replace(from, () => to)
  }
  if (options.append) source += `\n${options.append}\n`
  for (const [name, value] of Object.entries(options.env ?? {})) vi.stubEnv(name, value)
  if (options.env) onTestFinished(() => void vi.unstubAllEnvs())
  const dir = new URL('.tmp/readme/', packageDir)
  await mkdir(dir, { recursive: true })
  const file = new URL('example.ts', dir)
  await writeFile(file, source)
  try {
    return (await import(fileURLToPath(file))) as M
  } finally {
    // Loaded (or failed): the copy goes, so linters and type checks of the repo never see it.
    await rm(dir, { recursive: true, force: true })
    await rmdir(new URL('..', dir)).catch(() => {}) // .tmp/ itself, when nothing else is in it
  }
}
