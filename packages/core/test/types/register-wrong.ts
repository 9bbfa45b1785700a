// Must NOT compile: the registered connection type is FakeConn, not string.
import { createScope, getSession, type Session } from '../../src/index.ts'
import { FakeDriver } from '../fake-driver.ts'

export const scope = createScope({ driver: new FakeDriver() })

declare module '../../src/index.ts' {
  interface Register {
    scope: typeof scope
  }
}

export const session: Session<string> = getSession()
