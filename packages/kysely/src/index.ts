export {
  /** The same as `isFatalPgError` of @scoped/pg. */
  isFatalPgError as isFatalPostgresError,
  /** The same as `isRetryablePgError` of @scoped/pg. */
  isRetryablePgError as isRetryablePostgresError,
} from '@scoped/pg'
export { KyselyDriver, type KyselyDriverOptions, kyselyDriver } from './kysely-driver.js'
export type { PgPoolLike } from './postgres.js'
export type { OutsideScope } from './scoped-driver.js'
export { type ScopedKyselyOptions, scopedKysely } from './scoped-kysely.js'
