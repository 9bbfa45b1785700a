/**
 * The ESM entry file of a package that only a workspace package depends on
 * (MikroORM is installed under packages/mikro-orm, not at the root).
 */
import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'

/** The ESM entry of `spec` as resolved from the package in `fromDir`; undefined if not installed. */
export function esmEntry(spec: string, fromDir: string): string | undefined {
  const req = createRequire(join(fromDir, 'package.json'))
  let manifestPath: string
  try {
    manifestPath = req.resolve(`${spec}/package.json`)
  } catch {
    return undefined
  }
  const manifest = JSON.parse(readFileSync(manifestPath, 'utf8')) as {
    exports?: Record<string, unknown>
    main?: string
  }
  const dot = manifest.exports?.['.'] as { import?: string | { default?: string } } | undefined
  const target =
    typeof dot?.import === 'string'
      ? dot.import
      : (dot?.import?.default ?? manifest.main ?? 'index.js')
  return join(dirname(manifestPath), target)
}
