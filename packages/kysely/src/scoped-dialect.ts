/**
 * The Dialect behind `scopedKysely`: the application's dialect for SQL
 * (compiler, adapter, introspector), with `ScopedDriver` as its driver.
 */
import type {
  DatabaseIntrospector,
  Dialect,
  DialectAdapter,
  Driver,
  Kysely,
  QueryCompiler,
} from 'kysely'
import type { ScopedDriver } from './scoped-driver.js'

/** The application's dialect with `ScopedDriver` as its driver. */
export class ScopedDialect implements Dialect {
  #dialect: Dialect
  #driver: ScopedDriver

  constructor(dialect: Dialect, driver: ScopedDriver) {
    this.#dialect = dialect
    this.#driver = driver
  }

  createDriver(): Driver {
    return this.#driver
  }

  createQueryCompiler(): QueryCompiler {
    return this.#dialect.createQueryCompiler()
  }

  createAdapter(): DialectAdapter {
    return this.#dialect.createAdapter()
  }

  createIntrospector(db: Kysely<any>): DatabaseIntrospector {
    return this.#dialect.createIntrospector(db)
  }
}
