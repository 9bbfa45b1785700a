/**
 * Top-level functions bound to the default scope (the one created without
 * `default: false`), so application code needs no scope import:
 *
 * ```ts
 * import { getSession, runJob } from '@scoped/core'
 * ```
 *
 * For types, register the default scope once:
 *
 * ```ts
 * declare module '@scoped/core' { interface Register { scope: typeof scope } }
 * ```
 */
import type { JobOptions, LoopOptions, Scope } from './scope.js'
import { closedDefaultScope, defaultScope } from './scope.js'
import type { Session } from './session.js'

/** Augment with `{ scope: typeof yourScope }` to type `getSession()` & co. */
// biome-ignore lint/suspicious/noEmptyInterface: filled in by module augmentation
export interface Register {}

type RegisteredScope = Register extends { scope: infer S } ? S : Scope<unknown>
/** The connection type of the registered default scope (`unknown` until one is registered). */
export type DefaultConnection = RegisteredScope extends Scope<infer C> ? C : unknown

function scope(call: string): Scope<DefaultConnection> {
  const s = defaultScope ?? closedDefaultScope
  if (!s) {
    throw new Error(
      `${call}: there is no default scope. Create one first: createScope({ driver }) ` +
        '(or pass default: true), or call the method on your scope object.',
    )
  }
  return s
}

/** The current session of the default scope. Throws `NoActiveScopeError` outside a scope. */
export function getSession(): Session<DefaultConnection> {
  return scope('getSession()').getSession()
}

/** True inside a scope of the default scope. */
export function hasSession(): boolean {
  return (defaultScope ?? closedDefaultScope)?.hasSession() ?? false
}

/** `scope.runJob` of the default scope. */
export function runJob<T>(fn: () => Promise<T>, opts?: JobOptions): Promise<T> {
  return scope('runJob()').runJob(fn, opts)
}

/** `scope.loop` of the default scope. */
export function loop(fn: () => Promise<void>, opts: LoopOptions): Promise<void> {
  return scope('loop()').loop(fn, opts)
}

/** `scope.remove` of the default scope. */
export function remove(): Promise<void> {
  return scope('remove()').remove()
}

/** The default scope itself (undefined when there is none). */
export function getDefaultScope(): Scope<DefaultConnection> | undefined {
  return defaultScope
}
