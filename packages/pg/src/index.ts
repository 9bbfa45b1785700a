export { CancelGuard, type CancellableClient, cancelBackend } from './cancel.js'
export { type PgDriverOptions, pgDriver } from './driver.js'
export { commitRefusal, isFatalPgError, isPgServerError, isRetryablePgError } from './errors.js'
export { type ScopedPool, type ScopedPoolOptions, scopedPool, serial } from './scoped-pool.js'
