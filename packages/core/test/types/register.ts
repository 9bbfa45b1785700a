// Compiled by types.test.ts with its own tsconfig: the augmentation below must not leak into other tests.
import { createScope, getSession, type Session } from '../../src/index.ts'
import { type FakeConn, FakeDriver } from '../fake-driver.ts'

export const scope = createScope({ driver: new FakeDriver() })

declare module '../../src/index.ts' {
  interface Register {
    scope: typeof scope
  }
}

// The default scope's connection type flows to the top-level getSession().
export const session: Session<FakeConn> = getSession()
export async function useIt(): Promise<number> {
  return getSession().use(async (conn) => conn.id)
}
