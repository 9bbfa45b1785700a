/**
 * Bundle a benchmark app with esbuild (the compiler tsup uses for the
 * published packages), so the measured processes run plain JavaScript under
 * plain `node`, on Node 20 and Node 24 alike. Running them under tsx would
 * measure its output instead: it keeps function names with a helper call per
 * function created, which is not what users run.
 *
 * `@scoped/*` resolve to the packages' current sources (what is being
 * measured); every other package stays an import, resolved at run time from
 * the workspace's node_modules, or, for packages only a workspace package
 * depends on (MikroORM), as an absolute path into that package's node_modules.
 */
import { existsSync } from 'node:fs'
import { mkdir } from 'node:fs/promises'
import { createRequire } from 'node:module'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { esmEntry } from './resolve-esm.ts'

export const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..')

/** Where bundles go: inside the workspace (node_modules resolve from there), ignored by git. */
export const outDir = join(root, '.tmp', 'bench')

const packages = ['core', 'pg', 'kysely', 'hono', 'fastify', 'express', 'mikro-orm']

interface EsbuildPlugin {
  name: string
  setup(build: {
    onResolve(
      opts: { filter: RegExp },
      cb: (args: {
        path: string
        importer: string
      }) => { path: string; external: boolean } | undefined,
    ): void
  }): void
}

interface Esbuild {
  build(options: Record<string, unknown>): Promise<unknown>
}

function loadEsbuild(): Esbuild {
  // esbuild comes with tsup (a root devDependency); resolve it from there.
  const fromRoot = createRequire(join(root, 'package.json'))
  const fromTsup = createRequire(fromRoot.resolve('tsup'))
  return fromTsup('esbuild') as Esbuild
}

function packageName(spec: string): string {
  const parts = spec.split('/')
  return spec.startsWith('@') ? parts.slice(0, 2).join('/') : parts[0]!
}

/**
 * A package installed at the root stays a bare import. One that only a
 * workspace package depends on (fastify-plugin, MikroORM) is imported by the
 * absolute path of its ESM entry, resolved from the package that imports it.
 * (Not through require.resolve from the root: under pnpm, NODE_PATH makes that
 * succeed where Node's ESM resolution then fails.)
 */
const workspaceDeps: EsbuildPlugin = {
  name: 'workspace-deps',
  setup(build) {
    build.onResolve({ filter: /^[@a-z]/ }, (args) => {
      if (args.path.startsWith('node:') || args.path.startsWith('@scoped/')) return undefined
      const name = packageName(args.path)
      if (existsSync(join(root, 'node_modules', name, 'package.json'))) {
        return { path: args.path, external: true }
      }
      const inPackage = /\/packages\/([^/]+)\//.exec(args.importer)?.[1]
      const from = join(root, 'packages', inPackage ?? 'mikro-orm')
      const entry = args.path === name ? esmEntry(name, from) : undefined
      return entry ? { path: entry, external: true } : undefined
    })
  },
}

/** Bundle `entry` (relative to bench/) into .tmp/bench/<name>.mjs; returns the output path. */
export async function bundle(entry: string, name: string): Promise<string> {
  await mkdir(outDir, { recursive: true })
  const outfile = join(outDir, `${name}.mjs`)
  const alias: Record<string, string> = {}
  for (const p of packages) alias[`@scoped/${p}`] = join(root, 'packages', p, 'src', 'index.ts')
  await loadEsbuild().build({
    entryPoints: [join(root, 'bench', entry)],
    outfile,
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    packages: 'external',
    alias,
    plugins: [workspaceDeps],
    sourcemap: 'inline',
    logLevel: 'warning',
  })
  return outfile
}
