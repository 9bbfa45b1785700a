export { type CommitOutcome, defaultCommitOn, type ScopedSessionOptions } from './options.js'
export { scopedSession } from './plugin.js'
