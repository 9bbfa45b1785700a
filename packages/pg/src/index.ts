export { type PgDriverOptions, pgDriver } from './driver.js'
export { isFatalPgError, isRetryablePgError } from './errors.js'
export { type ScopedPool, type ScopedPoolOptions, scopedPool, serial } from './scoped-pool.js'
