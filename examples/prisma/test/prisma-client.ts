/**
 * The generated Prisma client, generated on first use. `prisma generate`
 * needs no engine binary (Prisma 7's query compiler is WebAssembly inside
 * @prisma/client), but the CLI downloads the schema engine eagerly at start;
 * the download host is not reachable here, so PRISMA_SCHEMA_ENGINE_BINARY
 * points at a stand-in that `generate` never runs.
 */
import { execFileSync } from 'node:child_process'
import { existsSync, statSync } from 'node:fs'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('..', import.meta.url))
const schema = `${root}prisma/schema.prisma`
const client = `${root}generated/client.ts`

/** The generated module (typed loosely: it does not exist before the first run, so tsc cannot see it). */
export async function loadPrismaClient(): Promise<{ PrismaClient: new (opts: object) => any }> {
  if (!existsSync(client) || statSync(client).mtimeMs < statSync(schema).mtimeMs) {
    execFileSync(`${root}node_modules/.bin/prisma`, ['generate', '--schema', schema], {
      cwd: root,
      env: {
        ...process.env,
        PRISMA_SCHEMA_ENGINE_BINARY: '/bin/false',
        PRISMA_HIDE_UPDATE_MESSAGE: '1',
      },
      stdio: 'pipe',
    })
  }
  const path: string = client
  return import(/* @vite-ignore */ path)
}
