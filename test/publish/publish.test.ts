/**
 * The published shape of every package under packages/: what a user gets from the
 * registry must load with both `import()` and `require()`, carry type declarations for
 * both, and import nothing it does not declare. The packages are packed with
 * `pnpm pack` and unpacked into a temporary consumer project, so this checks the
 * tarball (files, exports, rewritten `workspace:` ranges), not the workspace.
 *
 * Needs `pnpm build` first; `pnpm test` runs it before vitest, and CI builds first.
 */
import { execFile } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import {
  bareImports,
  builtCode,
  declaredClasses,
  filesUnder,
  importClosure,
  isBuiltin,
  packageOf,
} from './dist-files.ts'
import {
  type ConditionalTarget,
  linkOnce,
  linkThirdParty,
  type Manifest,
  packInto,
  type WorkspacePackage,
  workspacePackages,
  workspaceRoot,
  writeText,
} from './packed.ts'

const run = promisify(execFile)
const packages = workspacePackages()

let consumer = ''
/** Unpacked tarball directory per package name. */
const unpacked = new Map<string, string>()

interface LoadedExport {
  /** The file Node resolved the specifier to. */
  file: string
  /** Export names, sorted. */
  keys: string[]
}

beforeAll(async () => {
  consumer = await mkdtemp(join(tmpdir(), 'scoped-publish-'))
  await writeText(join(consumer, 'package.json'), '{ "name": "consumer", "private": true }\n')
  // Every package is packed, built or not: an unbuilt one fails its own tests below
  // with a message, and the others are still checked.
  for (const pkg of packages) unpacked.set(pkg.manifest.name, await packInto(pkg, consumer))
  for (const pkg of packages) await linkThirdParty(pkg, consumer)
  await linkOnce(
    join(workspaceRoot, 'node_modules', '@types', 'node'),
    join(consumer, 'node_modules', '@types', 'node'),
  )
}, 120_000)

afterAll(async () => {
  if (consumer) await rm(consumer, { recursive: true, force: true })
})

function assertBuilt(pkg: WorkspacePackage): void {
  if (!existsSync(join(pkg.dir, 'dist', 'index.js'))) {
    throw new Error(
      `packages/${pkg.folder}/dist/index.js is missing: run \`pnpm build\` first ` +
        '(`pnpm test` builds before it runs vitest; CI builds in its own stage)',
    )
  }
}

/** Packed package.json (after pnpm rewrote `workspace:` ranges). */
function packedManifest(pkg: WorkspacePackage): Manifest {
  const dir = unpacked.get(pkg.manifest.name) as string
  return JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as Manifest
}

/** `.` → `@scoped/core`, `./testing` → `@scoped/core/testing`; `./package.json` is left out. */
function codeExports(manifest: Manifest): [specifier: string, target: ConditionalTarget][] {
  return Object.entries(manifest.exports ?? {})
    .filter(([key]) => key !== './package.json')
    .map(([key, target]) => [
      key === '.' ? manifest.name : `${manifest.name}/${key.slice(2)}`,
      target as ConditionalTarget,
    ])
}

const loads = new Map<string, Promise<Record<string, LoadedExport>>>()

/**
 * Load every export of `pkg` in a fresh Node process (the Node running this test,
 * so a Node 24 run checks Node 24) from the consumer directory.
 */
function load(pkg: WorkspacePackage, mode: 'import' | 'require') {
  const key = `${pkg.manifest.name}:${mode}`
  let pending = loads.get(key)
  if (!pending) {
    const script =
      mode === 'import'
        ? `const out = {}
           for (const s of JSON.parse(process.env.SPECIFIERS)) {
             const m = await import(s)
             out[s] = { file: import.meta.resolve(s), keys: Object.keys(m).sort() }
           }
           console.log(JSON.stringify(out))`
        : `const out = {}
           for (const s of JSON.parse(process.env.SPECIFIERS)) {
             const m = require(s)
             out[s] = { file: require.resolve(s), keys: Object.keys(m).sort() }
           }
           console.log(JSON.stringify(out))`
    const args = mode === 'import' ? ['--input-type=module', '-e', script] : ['-e', script]
    const specifiers = codeExports(pkg.manifest).map(([s]) => s)
    pending = run(process.execPath, args, {
      cwd: consumer,
      env: { ...process.env, SPECIFIERS: JSON.stringify(specifiers) },
    }).then(
      ({ stdout }) => JSON.parse(stdout) as Record<string, LoadedExport>,
      (e: { stderr?: string }) => {
        // Node's own message (`Error [ERR_MODULE_NOT_FOUND]: Cannot find module ...`).
        const reason = e.stderr?.split('\n').find((l) => /^\w*Error\b/.test(l)) ?? e.stderr
        throw new Error(`${mode} of ${specifiers.join(', ')} failed: ${reason}`)
      },
    )
    loads.set(key, pending)
  }
  return pending
}

describe.each(packages)('$manifest.name', (pkg) => {
  const { name } = pkg.manifest

  it('is built: dist/index.js exists', () => {
    assertBuilt(pkg)
  })

  it('has ESM, CJS, .d.ts and .d.cts files in the tarball for every export', () => {
    assertBuilt(pkg)
    const manifest = packedManifest(pkg)
    const files = new Set(filesUnder(unpacked.get(name) as string))
    const has = (path: string | undefined) => !!path && files.has(path.replace(/^\.\//, ''))
    const problems: string[] = []
    const exportsMap = manifest.exports ?? {}
    if (!('.' in exportsMap)) problems.push('exports has no "." entry')
    if (exportsMap['./package.json'] !== './package.json') {
      problems.push('exports should map "./package.json" to "./package.json" (tools read it)')
    }
    const expected = {
      import: { types: '.d.ts', default: '.js' },
      require: { types: '.d.cts', default: '.cjs' },
    } as const
    for (const [specifier, target] of codeExports(manifest)) {
      for (const condition of ['import', 'require'] as const) {
        const branch = target?.[condition]
        if (!branch || typeof branch !== 'object') {
          problems.push(`${specifier}: no "${condition}" condition object`)
          continue
        }
        if (Object.keys(branch)[0] !== 'types') {
          problems.push(
            `${specifier}: "${condition}.types" must come first (TypeScript reads in order)`,
          )
        }
        for (const field of ['types', 'default'] as const) {
          const path = branch[field]
          if (!path?.endsWith(expected[condition][field])) {
            problems.push(
              `${specifier}: ${condition}.${field} = ${path}, expected a ${expected[condition][field]} file`,
            )
          } else if (!has(path)) {
            problems.push(`${specifier}: ${condition}.${field} = ${path} is not in the tarball`)
          }
        }
      }
    }
    for (const field of ['main', 'module', 'types'] as const) {
      if (manifest[field] && !has(manifest[field])) {
        problems.push(`"${field}": ${manifest[field]} is not in the tarball`)
      }
    }
    expect(problems).toEqual([])
  })

  it('exports every entry point it builds, and builds every entry point it exports', () => {
    assertBuilt(pkg)
    const built = filesUnder(join(pkg.dir, 'dist'))
      .map((f) => /^(?:(.+)\/)?index\.js$/.exec(f))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => (m[1] ? `./${m[1]}` : '.'))
      .sort()
    const exported = Object.keys(pkg.manifest.exports ?? {})
      .filter((k) => k !== './package.json')
      .sort()
    // A subpath whose source exists is built (see scripts/tsup-config.ts); it also needs an
    // "exports" entry in package.json, or users cannot import it.
    expect(built, `packages/${pkg.folder}: dist entry points vs package.json "exports"`).toEqual(
      exported,
    )
  })

  it('loads every export with import() and require(), with the same names from both', async () => {
    assertBuilt(pkg)
    const [esm, cjs] = await Promise.all([load(pkg, 'import'), load(pkg, 'require')])
    for (const [specifier, target] of codeExports(pkg.manifest)) {
      const fromImport = esm[specifier]
      const fromRequire = cjs[specifier]
      expect(fromImport?.file, `import('${specifier}') resolves to`).toMatch(
        new RegExp(`${target.import.default.slice(1).replace(/\./g, '\\.')}$`),
      )
      // On Node >= 22 require() can load ESM too, so insist on the CJS file itself.
      expect(fromRequire?.file, `require('${specifier}') resolves to`).toMatch(
        new RegExp(`${target.require.default.slice(1).replace(/\./g, '\\.')}$`),
      )
      expect(fromImport?.keys.length, `import('${specifier}') has exports`).toBeGreaterThan(0)
      expect(fromRequire?.keys, `require('${specifier}') names vs import()`).toEqual(
        fromImport?.keys,
      )
    }
  })

  it('imports only Node built-ins and its declared dependencies, with no workspace: ranges', () => {
    assertBuilt(pkg)
    const manifest = packedManifest(pkg)
    const declared = new Set(
      Object.keys({ ...manifest.dependencies, ...manifest.peerDependencies }),
    )
    const undeclared: string[] = []
    for (const extension of ['.js', '.cjs'] as const) {
      for (const [file, code] of builtCode(pkg.dir, extension)) {
        for (const spec of bareImports(code)) {
          if (!isBuiltin(spec) && !declared.has(packageOf(spec))) {
            undeclared.push(`dist/${file} imports ${spec}`)
          }
        }
      }
    }
    expect(undeclared, 'add these to dependencies or peerDependencies').toEqual([])
    expect(JSON.stringify(manifest)).not.toContain('workspace:')
  })

  it('declares each class once per format, so subpath entries share one copy of the state', () => {
    assertBuilt(pkg)
    for (const extension of ['.js', '.cjs'] as const) {
      const seen = new Map<string, string>()
      const twice: string[] = []
      for (const [file, code] of builtCode(pkg.dir, extension)) {
        for (const cls of declaredClasses(code)) {
          const first = seen.get(cls)
          if (first) twice.push(`class ${cls} in dist/${first} and dist/${file}`)
          else seen.set(cls, file)
        }
      }
      expect(twice).toEqual([])
    }
  })
})

describe('@scoped/core', () => {
  const core = packages.find((p) => p.manifest.name === '@scoped/core')

  function builtCore(): WorkspacePackage {
    expect(core, 'packages/core/package.json').toBeDefined()
    assertBuilt(core as WorkspacePackage)
    return core as WorkspacePackage
  }

  it('has no dependencies, and only optional peers (for its opt-in subpaths)', () => {
    const manifest = packedManifest(builtCore()) as Manifest & {
      peerDependenciesMeta?: Record<string, { optional?: boolean }>
    }
    expect(manifest.dependencies ?? {}).toEqual({})
    expect(manifest.optionalDependencies ?? {}).toEqual({})
    const required = Object.keys(manifest.peerDependencies ?? {}).filter(
      (name) => manifest.peerDependenciesMeta?.[name]?.optional !== true,
    )
    expect(required, 'peers not marked optional in peerDependenciesMeta').toEqual([])
  })

  it('main entry imports nothing but node: built-ins, in ESM and CJS', () => {
    const pkg = builtCore()
    const dist = join(pkg.dir, 'dist')
    for (const entry of ['index.js', 'index.cjs']) {
      for (const [file, code] of importClosure(dist, entry)) {
        const foreign = bareImports(code).filter((s) => !s.startsWith('node:'))
        expect(foreign, `dist/${file} (loaded by dist/${entry})`).toEqual([])
      }
    }
  })

  it('loads with import() and require() when nothing else is installed', async () => {
    const pkg = builtCore()
    const alone = await mkdtemp(join(tmpdir(), 'scoped-core-alone-'))
    try {
      await writeText(join(alone, 'package.json'), '{ "name": "alone", "private": true }\n')
      await packInto(pkg, alone)
      const esm = await run(
        process.execPath,
        [
          '--input-type=module',
          '-e',
          "const m = await import('@scoped/core'); console.log(typeof m.createScope)",
        ],
        { cwd: alone },
      )
      const cjs = await run(
        process.execPath,
        ['-e', "console.log(typeof require('@scoped/core').createScope)"],
        { cwd: alone },
      )
      expect([esm.stdout.trim(), cjs.stdout.trim()]).toEqual(['function', 'function'])
    } finally {
      await rm(alone, { recursive: true, force: true })
    }
  })
})

describe('type declarations', () => {
  it('type-check for ESM (.mts) and CJS (.cts) consumers under module nodenext', async () => {
    // Touch every runtime export through the types, so a value missing from the
    // declarations (or a declaration file TypeScript cannot find) is an error.
    // Packages that are not built or do not load are reported, and the rest still checked.
    const problems: string[] = []
    const esm: string[] = []
    const cjs: string[] = []
    let n = 0
    for (const pkg of packages) {
      let loaded: [Record<string, LoadedExport>, Record<string, LoadedExport>]
      try {
        assertBuilt(pkg)
        loaded = await Promise.all([load(pkg, 'import'), load(pkg, 'require')])
      } catch (e) {
        problems.push(`${pkg.manifest.name}: not checked: ${(e as Error).message.split('\n')[0]}`)
        continue
      }
      const [fromImport, fromRequire] = loaded
      for (const [specifier] of codeExports(pkg.manifest)) {
        const id = `m${n++}`
        esm.push(`import * as ${id} from '${specifier}'`)
        cjs.push(`import ${id} = require('${specifier}')`)
        for (const key of fromImport[specifier]?.keys ?? []) esm.push(`void ${id}.${key}`)
        for (const key of fromRequire[specifier]?.keys ?? []) cjs.push(`void ${id}.${key}`)
      }
    }
    await writeText(join(consumer, 'esm.mts'), `${esm.join('\n')}\nexport {}\n`)
    await writeText(join(consumer, 'cjs.cts'), `${cjs.join('\n')}\nexport {}\n`)
    // One program per module kind, as a project is one or the other: in a program that
    // imports a package both ways, the ESM and CJS copies of a declaration merged into a
    // framework's types (fastify's `request.session`) are two different types.
    // skipLibCheck, as users have it: the ORMs' own declarations do not all check (drizzle
    // imports optional drivers' types); what matters here is that every export resolves
    // to declarations under both conditions and declares every runtime export.
    const tsc = join(workspaceRoot, 'node_modules', 'typescript', 'bin', 'tsc')
    const errors = await Promise.all(
      (['esm.mts', 'cjs.cts'] as const).map(async (file) => {
        const project = `tsconfig.${file.slice(0, 3)}.json`
        await writeText(
          join(consumer, project),
          JSON.stringify({
            compilerOptions: {
              module: 'nodenext',
              moduleResolution: 'nodenext',
              target: 'es2022',
              strict: true,
              noEmit: true,
              skipLibCheck: true,
              types: ['node'],
            },
            files: [file],
          }),
        )
        return run(process.execPath, [tsc, '-p', project], { cwd: consumer }).then(
          () => '',
          (e: { stdout?: string; stderr?: string }) => `${e.stdout ?? ''}${e.stderr ?? ''}`,
        )
      }),
    )
    for (const [i, output] of errors.entries()) {
      if (output) {
        problems.push(`tsc errors for ${i === 0 ? 'ESM' : 'CJS'} consumers:\n${output}`)
      }
    }
    expect(problems).toEqual([])
  }, 180_000)
})
