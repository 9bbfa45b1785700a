export { KyselyDriver, type KyselyDriverOptions, kyselyDriver } from './kysely-driver.js'
export {
  isFatalPostgresError,
  isRetryablePostgresError,
  type PgPoolLike,
} from './postgres.js'
export type { OutsideScope } from './scoped-driver.js'
export { type ScopedKyselyOptions, scopedKysely } from './scoped-kysely.js'
