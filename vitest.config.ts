import { fileURLToPath } from 'node:url'
import { defineConfig } from 'vitest/config'

const src = (pkg: string, file = 'index.ts') =>
  fileURLToPath(new URL(`./packages/${pkg}/src/${file}`, import.meta.url))

// Tests import the packages' TypeScript sources directly, so vitest itself
// needs no build; `pnpm test` builds first only for test/publish (the published shape).
export const alias = [
  { find: /^@scoped\/core\/testing$/, replacement: src('core', 'testing/index.ts') },
  { find: /^@scoped\/core\/otel$/, replacement: src('core', 'otel/index.ts') },
  { find: /^@scoped\/core\/page$/, replacement: src('core', 'page/index.ts') },
  {
    find: /^@scoped\/(core|pg|kysely|hono|fastify|express|typeorm|mikro-orm|drizzle)$/,
    replacement: src('$1'),
  },
]

export default defineConfig({
  resolve: { alias },
  test: {
    include: ['packages/*/test/**/*.test.ts', 'test/**/*.test.ts', 'examples/*/test/**/*.test.ts'],
    exclude: ['**/node_modules/**', '**/dist/**', 'test/reliability/long/**'],
    globalSetup: ['./test/support/global-setup.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: 'forks',
    reporters: ['default'],
  },
})
