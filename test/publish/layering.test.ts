/**
 * The layering of DESIGN.md: "core knows nothing of HTTP/SQL/ORMs; adapters know nothing
 * of SQL", and drivers nothing of HTTP. Read from the TypeScript sources (comments
 * stripped, type-only imports included) and from the built `dist/` files that are
 * published (publish.test.ts checks the core main entry's imports only).
 */
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { bareImports, filesUnder, packageOf } from './dist-files.ts'
import { workspaceRoot } from './packed.ts'

const CORE = 'core'
const ADAPTERS = ['hono', 'fastify', 'express']
const DRIVERS = ['pg', 'kysely', 'typeorm', 'drizzle', 'mikro-orm']

const HTTP = [
  'node:http',
  'node:https',
  'node:http2',
  'http',
  'https',
  'http2',
  'hono',
  '@hono/node-server',
  'fastify',
  'fastify-plugin',
  'express',
  'router',
  '@scoped/hono',
  '@scoped/fastify',
  '@scoped/express',
]
const SQL = [
  'pg',
  'pg-pool',
  'pg-cursor',
  'pg-query-stream',
  'postgres',
  'kysely',
  'typeorm',
  'drizzle-orm',
  '@mikro-orm/core',
  '@mikro-orm/postgresql',
  '@prisma/client',
  'knex',
  'sequelize',
  ...DRIVERS.map((d) => `@scoped/${d}`),
]

/** Code without its comments (good enough for this repository's sources and builds). */
function stripComments(code: string): string {
  return code.replace(/\/\*[\s\S]*?\*\//g, '').replace(/(^|[^:'"`\\])\/\/.*$/gm, '$1')
}

/** Module specifiers of `import … from`, `import type … from`, `export … from`, import(), require(). */
function imports(code: string): string[] {
  const found = new Set(bareImports(code))
  for (const m of code.matchAll(/\b(?:import|export)\s+type\b[^'"]*?from\s*['"]([^'"]+)['"]/g)) {
    found.add(m[1] as string)
  }
  return [...found].filter((s) => !s.startsWith('.') && !s.startsWith('/'))
}

/** The string literals and template-literal texts of some code. */
function strings(code: string): string[] {
  return [...code.matchAll(/'((?:[^'\\\n]|\\.)*)'|"((?:[^"\\\n]|\\.)*)"|`((?:[^`\\]|\\.)*)`/g)].map(
    (m) => (m[1] ?? m[2] ?? m[3]) as string,
  )
}

/**
 * A string that is an SQL statement (or starts one), as drivers send them. Uppercase, as this
 * repository writes SQL. A bare `COMMIT`/`ROLLBACK`/`BEGIN` is also a word of error messages
 * ("COMMIT of 'GET /x' failed"), so alone it counts only where it is sent (`query('COMMIT')`).
 */
const SQL_STATEMENT =
  /^[\s;]*(?:SELECT\s[\s\S]*\bFROM\b|SELECT\s+\d|INSERT\s+INTO\s|UPDATE\s+\S+\s+SET\s|DELETE\s+FROM\s|(?:BEGIN|START\s+TRANSACTION)\s+(?:TRANSACTION|WORK|ISOLATION|READ)\b|ROLLBACK\s+TO\s+SAVEPOINT\s|SAVEPOINT\s|RELEASE\s+SAVEPOINT\s|SET\s+(?:LOCAL\s+|SESSION\s+)?(?:TRANSACTION\b|[a-z_]+\s*(?:=|TO\b))|SHOW\s+[a-z_]+)|\bset_config\(|\bpg_[a-z_]+\(/
const SENT_KEYWORD =
  /\b(?:query|execute|executeQuery|raw|unsafe|statement|sql)\s*\(\s*[^,()]*?['"`](?:BEGIN|COMMIT|ROLLBACK|START TRANSACTION)\s*;?['"`]/g

function sqlStrings(code: string): string[] {
  const plain = stripComments(code)
  return [
    ...strings(plain).filter((s) => SQL_STATEMENT.test(s)),
    ...[...plain.matchAll(SENT_KEYWORD)].map((m) => m[0]),
  ]
}

interface Source {
  file: string
  code: string
}

/** The package's TypeScript sources and its built JavaScript (both formats). */
function sources(pkg: string): Source[] {
  const dir = join(workspaceRoot, 'packages', pkg)
  const src = filesUnder(join(dir, 'src'))
    .filter((f) => f.endsWith('.ts'))
    .map((f) => ({ file: `src/${f}`, code: readFileSync(join(dir, 'src', f), 'utf8') }))
  const dist = join(dir, 'dist')
  expect(existsSync(dist), `packages/${pkg}/dist (run pnpm build)`).toBe(true)
  const built = filesUnder(dist)
    .filter((f) => f.endsWith('.js') || f.endsWith('.cjs'))
    .map((f) => ({ file: `dist/${f}`, code: readFileSync(join(dist, f), 'utf8') }))
  expect(src.length).toBeGreaterThan(0)
  expect(built.length).toBeGreaterThan(0)
  return [...src, ...built]
}

function importsOf(pkg: string, banned: string[]): string[] {
  const bad: string[] = []
  for (const { file, code } of sources(pkg)) {
    for (const spec of imports(stripComments(code))) {
      if (banned.includes(spec) || banned.includes(packageOf(spec))) {
        bad.push(`packages/${pkg}/${file} imports ${spec}`)
      }
    }
  }
  return bad
}

function sqlOf(pkg: string): string[] {
  const bad: string[] = []
  for (const { file, code } of sources(pkg)) {
    for (const s of sqlStrings(code)) bad.push(`packages/${pkg}/${file}: ${JSON.stringify(s)}`)
  }
  return bad
}

describe('layering (DESIGN.md: core knows nothing of HTTP/SQL/ORMs; adapters nothing of SQL)', () => {
  it('the SQL detector finds the statements the drivers do send (so the checks below are not vacuous)', () => {
    const pg = sqlOf('pg').join('\n')
    expect(pg).toMatch(/SET LOCAL statement_timeout/)
    expect(pg).toMatch(/SAVEPOINT/)
    expect(pg).toMatch(/SELECT 1/)
    expect(pg).toMatch(/query\(['"]COMMIT/)
    expect(importsOf('pg', SQL)).toContain('packages/pg/src/driver.ts imports pg')
    expect(importsOf('express', HTTP).join('\n')).toMatch(/imports express/)
  })

  it('@scoped/core (every entry: main, testing, otel, page) imports nothing of HTTP, SQL or an ORM', () => {
    expect(importsOf(CORE, [...HTTP, ...SQL, 'node:net', 'net', 'node:tls', 'tls'])).toEqual([])
  })

  it('@scoped/core holds no SQL', () => {
    expect(sqlOf(CORE)).toEqual([])
  })

  for (const adapter of ADAPTERS) {
    it(`@scoped/${adapter} imports no SQL client, driver or ORM`, () => {
      expect(importsOf(adapter, SQL)).toEqual([])
    })
    it(`@scoped/${adapter} holds no SQL`, () => {
      expect(sqlOf(adapter)).toEqual([])
    })
  }

  for (const driver of DRIVERS) {
    it(`@scoped/${driver} imports nothing of HTTP (no server, framework or adapter)`, () => {
      expect(importsOf(driver, HTTP)).toEqual([])
    })
  }
})
