/**
 * Reading built output: which files a `dist/` holds, which modules its code imports,
 * and which classes it declares.
 */
import { readdirSync, readFileSync } from 'node:fs'
import { builtinModules } from 'node:module'
import { dirname, join, relative } from 'node:path'

/** Every file under `dir`, as paths relative to it with `/` separators. */
export function filesUnder(dir: string): string[] {
  const out: string[] = []
  const walk = (d: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      if (e.isDirectory()) walk(join(d, e.name))
      else out.push(relative(dir, join(d, e.name)).split('\\').join('/'))
    }
  }
  walk(dir)
  return out.sort()
}

const specifierPatterns = [
  /\bfrom\s*["']([^"']+)["']/g,
  /\bimport\s*["']([^"']+)["']/g,
  /\bimport\(\s*["']([^"']+)["']\s*\)/g,
  /\brequire\(\s*["']([^"']+)["']\s*\)/g,
]

function specifiers(code: string): string[] {
  const found = new Set<string>()
  for (const pattern of specifierPatterns) {
    for (const m of code.matchAll(pattern)) found.add(m[1] as string)
  }
  return [...found].sort()
}

/** Module specifiers imported or required by built code, minus relative ones. */
export function bareImports(code: string): string[] {
  return specifiers(code).filter((s) => !s.startsWith('.') && !s.startsWith('/'))
}

/**
 * The built files that loading `entry` (relative to `distDir`) pulls in through
 * relative imports, the entry included: what `import('@scoped/core')` really runs.
 */
export function importClosure(distDir: string, entry: string): Map<string, string> {
  const out = new Map<string, string>()
  const visit = (file: string) => {
    if (out.has(file)) return
    const code = readFileSync(join(distDir, file), 'utf8')
    out.set(file, code)
    for (const spec of specifiers(code).filter((s) => s.startsWith('.'))) {
      visit(
        relative(distDir, join(distDir, dirname(file), spec))
          .split('\\')
          .join('/'),
      )
    }
  }
  visit(entry)
  return out
}

/** `pg/lib/x` → `pg`, `@scope/a/b` → `@scope/a`. */
export function packageOf(specifier: string): string {
  const parts = specifier.split('/')
  return (specifier.startsWith('@') ? parts.slice(0, 2) : parts.slice(0, 1)).join('/')
}

/** True for `node:fs`, `fs`, `fs/promises` and the like. */
export function isBuiltin(specifier: string): boolean {
  return specifier.startsWith('node:') || builtinModules.includes(specifier)
}

/** Names of the classes declared in a built file (`class X` / `class X extends`). */
export function declaredClasses(code: string): string[] {
  return [...code.matchAll(/\bclass\s+([A-Za-z_$][\w$]*)\s*(?:extends\b[^{]*)?\{/g)].map(
    (m) => m[1] as string,
  )
}

/** Built JavaScript files of one format in a package directory (`.js` = ESM, `.cjs` = CJS). */
export function builtCode(packageDir: string, extension: '.js' | '.cjs'): Map<string, string> {
  const files = filesUnder(join(packageDir, 'dist')).filter((f) => f.endsWith(extension))
  return new Map(files.map((f) => [f, readFileSync(join(packageDir, 'dist', f), 'utf8')]))
}
