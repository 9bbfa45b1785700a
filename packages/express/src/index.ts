export { type CommitOutcome, defaultCommitOn, type ScopedSessionOptions } from './options.js'
export { scopedSession } from './scoped-session.js'
