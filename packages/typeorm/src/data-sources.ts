import type { Driver, Scope } from '@scoped/core'
import type { DataSource, QueryRunner } from 'typeorm'

/** Which DataSource each driver made by `typeormDriver()` serves, so helpers need only the scope. */
const sources = new WeakMap<Driver<QueryRunner>, DataSource>()

/** @internal */
export function rememberDataSource(driver: Driver<QueryRunner>, dataSource: DataSource): void {
  sources.set(driver, dataSource)
}

/** @internal The DataSource behind a scope made with `typeormDriver()`; a TypeError naming `call` otherwise. */
export function dataSourceOf(scope: Scope<QueryRunner>, call: string): DataSource {
  const ds = typeof scope === 'object' && scope !== null ? sources.get(scope.driver) : undefined
  if (!ds) {
    throw new TypeError(
      `${call}(scope): expected a scope created with createScope({ driver: typeormDriver(dataSource) }).`,
    )
  }
  return ds
}
