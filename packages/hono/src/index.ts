export { type CommitOutcome, type ScopedSessionOptions } from './options.js'
export { scopedSession } from './scoped-session.js'
