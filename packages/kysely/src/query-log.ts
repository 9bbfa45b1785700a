/**
 * Kysely's query log (`scopedKysely(scope, { log })`), as plain Kysely writes
 * it: one `query` event per statement or stream with its duration, one
 * `error` event per failure.
 */
import type { CompiledQuery, Log, QueryResult } from 'kysely'

export async function logged<R>(
  log: Log,
  query: CompiledQuery,
  run: () => Promise<QueryResult<R>>,
): Promise<QueryResult<R>> {
  const start = performance.now()
  let result: QueryResult<R>
  try {
    result = await run()
  } catch (error) {
    await log.error(() => ({
      level: 'error',
      error,
      query,
      queryDurationMillis: performance.now() - start,
    }))
    throw error
  }
  await log.query(() => ({
    level: 'query',
    isStream: false,
    query,
    queryDurationMillis: performance.now() - start,
  }))
  return result
}

export async function* loggedStream<R>(
  log: Log,
  query: CompiledQuery,
  stream: AsyncIterableIterator<QueryResult<R>>,
): AsyncIterableIterator<QueryResult<R>> {
  const start = performance.now()
  try {
    yield* stream
  } catch (error) {
    await log.error(() => ({
      level: 'error',
      error,
      query,
      queryDurationMillis: performance.now() - start,
    }))
    throw error
  }
  await log.query(() => ({
    level: 'query',
    isStream: true,
    query,
    queryDurationMillis: performance.now() - start,
  }))
}
