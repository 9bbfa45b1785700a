export type { CommitOutcome, ScopedSessionOptions } from './options.js'
export { scopedSession } from './scoped-session.js'
