/**
 * Packs the workspace packages the way `pnpm publish` would and unpacks them into
 * a throw-away consumer project, so the publish test loads exactly the files a user
 * would get from the registry (not the workspace sources vitest aliases to).
 */
import { execFile } from 'node:child_process'
import { existsSync, readdirSync, readFileSync } from 'node:fs'
import { mkdir, realpath, symlink, writeFile } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'

const run = promisify(execFile)

export const workspaceRoot = fileURLToPath(new URL('../..', import.meta.url))

/** The condition objects our package.json files use for each `exports` key. */
export interface ConditionalTarget {
  import: { types: string; default: string }
  require: { types: string; default: string }
}

export interface Manifest {
  name: string
  version: string
  main?: string
  module?: string
  types?: string
  exports?: Record<string, string | ConditionalTarget>
  dependencies?: Record<string, string>
  peerDependencies?: Record<string, string>
  optionalDependencies?: Record<string, string>
}

export interface WorkspacePackage {
  /** Folder name under packages/, e.g. `core`. */
  folder: string
  /** Absolute path of packages/<folder>. */
  dir: string
  manifest: Manifest
}

/** Every packages/* folder with a package.json, read synchronously so tests can be declared per package. */
export function workspacePackages(): WorkspacePackage[] {
  const base = join(workspaceRoot, 'packages')
  return readdirSync(base, { withFileTypes: true })
    .filter((d) => d.isDirectory() && existsSync(join(base, d.name, 'package.json')))
    .map((d) => ({
      folder: d.name,
      dir: join(base, d.name),
      manifest: JSON.parse(readFileSync(join(base, d.name, 'package.json'), 'utf8')) as Manifest,
    }))
    .sort((a, b) => a.folder.localeCompare(b.folder))
}

/**
 * pnpm, run by the same Node that runs the tests: `npm_execpath` is set when the test
 * run was started through pnpm (`pnpm test`); otherwise `pnpm` from PATH.
 */
function pnpmCommand(): [string, string[]] {
  const execPath = process.env.npm_execpath
  if (execPath && /pnpm/.test(execPath) && /\.(c?js|mjs)$/.test(execPath)) {
    return [process.execPath, [execPath]]
  }
  return ['pnpm', []]
}

/**
 * `pnpm pack` one package (which also rewrites `workspace:` ranges the way publish does)
 * and unpack the tarball into `<consumer>/node_modules/<name>`.
 */
export async function packInto(pkg: WorkspacePackage, consumer: string): Promise<string> {
  const tarballs = join(consumer, '.tarballs')
  await mkdir(tarballs, { recursive: true })
  const [cmd, prefix] = pnpmCommand()
  const { stdout } = await run(cmd, [...prefix, 'pack', '--json', '--pack-destination', tarballs], {
    cwd: pkg.dir,
    maxBuffer: 16 * 1024 * 1024,
  })
  const { filename } = JSON.parse(stdout) as { filename: string }
  const target = join(consumer, 'node_modules', pkg.manifest.name)
  await mkdir(target, { recursive: true })
  await run('tar', ['-xzf', filename, '-C', target, '--strip-components=1'])
  return target
}

/** Where the workspace has `name` installed for `pkg`: its own node_modules, then the root's. */
export function installedCopy(pkg: WorkspacePackage, name: string): string | undefined {
  for (const base of [join(pkg.dir, 'node_modules'), join(workspaceRoot, 'node_modules')]) {
    if (existsSync(join(base, name, 'package.json'))) return join(base, name)
  }
  return undefined
}

/** The DefinitelyTyped package name for `name` (`@scope/x` → `@types/scope__x`). */
export function typesPackageName(name: string): string {
  return `@types/${name.startsWith('@') ? name.slice(1).replace('/', '__') : name}`
}

/**
 * Link each third-party dependency and peer of `pkg` (and its `@types/*`, for the type
 * check) from the workspace's install into the consumer. Packages of this workspace
 * come from their tarballs instead, so they are not linked.
 */
export async function linkThirdParty(pkg: WorkspacePackage, consumer: string): Promise<void> {
  const { dependencies = {}, peerDependencies = {} } = pkg.manifest
  const names = Object.keys({ ...dependencies, ...peerDependencies }).filter(
    (n) => !n.startsWith('@scoped/'),
  )
  for (const name of names) {
    const found = installedCopy(pkg, name)
    if (!found) {
      throw new Error(
        `${pkg.manifest.name} depends on ${name}, but the workspace has no installed copy: run \`pnpm install\``,
      )
    }
    await linkOnce(found, join(consumer, 'node_modules', name))
    const types = installedCopy(pkg, typesPackageName(name))
    if (types) await linkOnce(types, join(consumer, 'node_modules', typesPackageName(name)))
  }
}

/** Symlink `to` → real path of `from`, unless another package already linked it. */
export async function linkOnce(from: string, to: string): Promise<void> {
  if (existsSync(to)) return
  await mkdir(dirname(to), { recursive: true })
  await symlink(await realpath(from), to, 'dir')
}

/** Write a file, creating its folder. */
export async function writeText(path: string, text: string): Promise<void> {
  await mkdir(dirname(path), { recursive: true })
  await writeFile(path, text)
}
