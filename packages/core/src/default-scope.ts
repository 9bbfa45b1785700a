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
import { NoActiveScopeError } from './errors.js'
import type { JobOptions, LoopOptions, Scope } from './scope.js'
import { closedDefaultScope, defaultScope } from './scope.js'
import type { Session } from './session.js'

/** Augment with `{ scope: typeof yourScope }` to type `getSession()` & co. */
// biome-ignore lint/suspicious/noEmptyInterface: filled in by module augmentation
export interface Register {}

type RegisteredScope = Register extends { scope: infer S } ? S : Scope<unknown>
/** The connection type of the registered default scope (`unknown` until one is registered). */
export type DefaultConnection = RegisteredScope extends Scope<infer C> ? C : unknown

/** The default scope (or the closed one, until another is made), if any. */
function current(): Scope<DefaultConnection> | undefined {
  return defaultScope ?? closedDefaultScope
}

/** The current session of the default scope. Throws `NoActiveScopeError` outside a scope. */
export function getSession(): Session<DefaultConnection> {
  const s = current()
  if (!s) throw new NoActiveScopeError(undefined, 'getSession()')
  return s.getSession()
}

/** True inside a scope of the default scope. */
export function hasSession(): boolean {
  return current()?.hasSession() ?? false
}

/** `scope.runJob` of the default scope. */
export function runJob<T>(fn: () => Promise<T>, opts?: JobOptions): Promise<T> {
  const s = current()
  if (!s) return Promise.reject(new NoActiveScopeError(undefined, 'runJob()'))
  return s.runJob(fn, opts)
}

/** `scope.loop` of the default scope. */
export function loop(fn: () => Promise<void>, opts: LoopOptions): Promise<void> {
  const s = current()
  if (!s) return Promise.reject(new NoActiveScopeError(undefined, 'loop()'))
  return s.loop(fn, opts)
}

/** `scope.remove` of the default scope. */
export function remove(): Promise<void> {
  const s = current()
  if (!s) return Promise.reject(new NoActiveScopeError(undefined, 'remove()'))
  return s.remove()
}

/** The default scope itself (undefined when there is none). */
export function getDefaultScope(): Scope<DefaultConnection> | undefined {
  return defaultScope
}
