/**
 * The one build recipe every `packages/*` shares, so the published shape stays
 * the same everywhere: ESM (`.js`) + CJS (`.cjs`) + `.d.ts` + `.d.cts` in `dist/`.
 *
 * The entry points come from the package's own `exports` map: an export whose
 * `import` target is `./dist/testing/index.js` is built from `src/testing/index.ts`.
 * Adding a subpath is therefore one edit (package.json); a subpath export whose source
 * does not exist yet is left out of the build, and test/publish then fails for it by
 * name. The main entry, src/index.ts, is always built, and its absence is an error.
 *
 *   // packages/core/tsup.config.ts
 *   export default packageBuild()
 */
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { defineConfig, type Options } from 'tsup'

interface ExportTarget {
  import?: string | { default?: string }
}

/** `{ 'testing/index': 'src/testing/index.ts', ... }` for the package in `dir`. */
export function entriesFromExports(dir: string): Record<string, string> {
  const manifest = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as {
    exports?: Record<string, string | ExportTarget>
  }
  const entry: Record<string, string> = {}
  for (const [key, target] of Object.entries(manifest.exports ?? {})) {
    if (key === './package.json' || typeof target !== 'object') continue
    const esm = typeof target.import === 'string' ? target.import : target.import?.default
    const name = esm && /^\.\/dist\/(.+)\.js$/.exec(esm)?.[1]
    if (!name) continue
    const source = join('src', `${name}.ts`)
    if (existsSync(join(dir, source))) entry[name] = source
  }
  if (!entry.index) {
    // Without the main entry there is no package: say so here rather than leave tsup
    // to print "No input files".
    if (!existsSync(join(dir, 'src', 'index.ts'))) {
      throw new Error(
        `${dir}: src/index.ts does not exist; the "." export of package.json is built from it`,
      )
    }
    entry.index = 'src/index.ts'
  }
  return entry
}

/** tsup options for the package in the current working directory (`pnpm run build` sets it). */
export function packageBuild(): Options {
  return defineConfig({
    entry: entriesFromExports(process.cwd()),
    format: ['esm', 'cjs'],
    dts: true,
    clean: true,
    sourcemap: true,
    target: 'node20',
    platform: 'node',
    // Subpath entries must share one copy of the core's state (AsyncLocalStorage,
    // the default-scope registry, error classes) within a format; without
    // splitting, each CJS entry would bundle its own copy and `instanceof` breaks.
    splitting: true,
    // Keep `node:` specifiers as written (tsup strips them by default); Node 20 has them.
    removeNodeProtocol: false,
  }) as Options
}
