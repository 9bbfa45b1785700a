export { type CommitOutcome, defaultCommitOn, type ScopedSessionOptions } from './options.js'
export { type ScopedFetch, type ScopedFetchOptions, scopedFetch } from './scoped-fetch.js'
export { scopedSession } from './scoped-session.js'
