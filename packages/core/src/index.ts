export {
  type DefaultConnection,
  getDefaultScope,
  getSession,
  hasSession,
  loop,
  type Register,
  remove,
  runJob,
} from './default-scope.js'
export {
  type AcquireMessage,
  type CloseMessage,
  type CommitMessage,
  channels,
  type ErrorMessage,
  type LeakMessage,
  type ReleaseMessage,
  type RollbackMessage,
  type TimeoutMessage,
} from './diagnostics.js'
export type {
  Driver,
  IsolationLevel,
  PoolStats,
  ReleaseOptions,
  SessionInfo,
  TxOptions,
} from './driver.js'
export {
  type AbortKind,
  NoActiveScopeError,
  PoolTimeoutError,
  ScopeAbortedError,
  ScopeClosedError,
  ScopedError,
  type ScopedErrorCode,
  SessionClosedError,
  TransactionStateError,
} from './errors.js'
export type { Holder } from './holders.js'
export type { Logger, ResolvedOptions, ScopeOptions } from './options.js'
export {
  createScope,
  type JobOptions,
  type LoopOptions,
  type OpenOptions,
  OpenScope,
  type RunOptions,
  type Scope,
  type ScopeStats,
} from './scope.js'
export {
  type Hook,
  type ReleaseMode,
  Session,
  type SessionOutcome,
  type SessionState,
  type TransactionMode,
} from './session.js'
