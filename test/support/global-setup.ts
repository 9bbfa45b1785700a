import type { TestProject } from 'vitest/node'
import { type Database, startDatabase } from '../../scripts/embedded-db.ts'

let db: Database | undefined

/** One PostgreSQL per test run: DATABASE_URL, or an embedded server on a free port. */
export async function setup(project: TestProject): Promise<void> {
  db = await startDatabase()
  project.provide('databaseUrl', db.url)
}

export async function teardown(): Promise<void> {
  await db?.stop()
}

declare module 'vitest' {
  export interface ProvidedContext {
    databaseUrl: string
  }
}
