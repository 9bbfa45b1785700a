/**
 * What `scopedKysely`'s Kysely driver hands out: a Kysely connection that
 * also carries its own transaction control, so the driver only routes.
 * Two kinds: `SessionConnection` (inside a scope) and `PoolConnection`
 * (outside, with `outsideScope: 'pool'`).
 */
import type { DatabaseConnection, QueryCompiler, TransactionSettings } from 'kysely'

export interface RoutedConnection extends DatabaseConnection {
  begin(settings: TransactionSettings): Promise<void>
  commit(): Promise<void>
  rollback(): Promise<void>
  savepoint(name: string, compileQuery: QueryCompiler['compileQuery']): Promise<void>
  rollbackToSavepoint(name: string, compileQuery: QueryCompiler['compileQuery']): Promise<void>
  releaseSavepoint(name: string, compileQuery: QueryCompiler['compileQuery']): Promise<void>
  release(): Promise<void>
}
