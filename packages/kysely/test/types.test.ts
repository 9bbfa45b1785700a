/**
 * scopedKysely<DB> is a Kysely<DB>: the full query-builder types, checked by
 * the compiler (`tsc -p tsconfig.json` covers this file) and at run time.
 */
import { createScope } from '@scoped/core'
import { kyselyDriver, scopedKysely } from '@scoped/kysely'
import {
  type ControlledTransaction,
  type DatabaseConnection,
  type Generated,
  Kysely,
  PostgresDialect,
  type Selectable,
  type Transaction,
} from 'kysely'
import pg from 'pg'
import { afterAll, describe, expectTypeOf, it } from 'vitest'

interface DB {
  person: { id: Generated<number>; first_name: string; last_name: string | null }
  pet: { id: Generated<number>; owner_id: number; name: string }
}

// Nothing connects: building queries and checking types needs no database.
const pool = new pg.Pool({ connectionString: 'postgres://nobody@127.0.0.1:1/none' })
const dialect = new PostgresDialect({ pool })
const scope = createScope({ driver: kyselyDriver(dialect, { pool }), default: false })
const db = scopedKysely<DB>(scope, { dialect })

afterAll(() => scope.close())

describe('scopedKysely<DB>', () => {
  it('is exactly Kysely<DB>, and an instance of Kysely', () => {
    expectTypeOf(db).toEqualTypeOf<Kysely<DB>>()
    expectTypeOf(scope.getSession).returns.toHaveProperty('use')
    expectTypeOf<Parameters<Parameters<typeof scope.run>[0]>>().toEqualTypeOf<[]>()
    if (!(db instanceof Kysely)) throw new Error('not a Kysely')
  })

  // Queries are only built and type-checked here; nothing below runs against a database.
  it('keeps row types of selects, inserts and joins', () => {
    const join = db
      .selectFrom('person')
      .innerJoin('pet', 'pet.owner_id', 'person.id')
      .select(['person.first_name', 'pet.name as pet_name'])
      .where('person.id', '=', 1)
    expectTypeOf<Awaited<ReturnType<typeof join.executeTakeFirstOrThrow>>>().toEqualTypeOf<{
      first_name: string
      pet_name: string
    }>()

    const all = db.selectFrom('person').selectAll()
    expectTypeOf<Awaited<ReturnType<typeof all.execute>>>().toEqualTypeOf<
      Selectable<DB['person']>[]
    >()

    const inserted = db
      .insertInto('person')
      .values({ first_name: 'Ada', last_name: null })
      .returning('id')
    expectTypeOf<Awaited<ReturnType<typeof inserted.executeTakeFirstOrThrow>>>().toEqualTypeOf<{
      id: number
    }>()
  })

  it('rejects unknown tables and columns at compile time', () => {
    const compileOnly = () => {
      // @ts-expect-error no such table
      db.selectFrom('animal')
      // @ts-expect-error no such column
      db.selectFrom('person').select('age')
      // @ts-expect-error first_name is a string
      db.insertInto('person').values({ first_name: 1 })
    }
    expectTypeOf(compileOnly).toBeFunction()
  })

  it('keeps transaction, controlled-transaction, connection and plugin types', () => {
    const compileOnly = async () => {
      const names = await db.transaction().execute(async (trx) => {
        expectTypeOf(trx).toEqualTypeOf<Transaction<DB>>()
        return trx.selectFrom('pet').select('name').execute()
      })
      expectTypeOf(names).toEqualTypeOf<{ name: string }[]>()
      const trx = await db.startTransaction().execute()
      expectTypeOf(trx).toEqualTypeOf<ControlledTransaction<DB, []>>()
      const afterSp = await trx.savepoint('sp').execute()
      expectTypeOf(afterSp).toEqualTypeOf<ControlledTransaction<DB, ['sp']>>()
      await db.connection().execute(async (conn) => {
        expectTypeOf(conn).toEqualTypeOf<Kysely<DB>>()
      })
    }
    expectTypeOf(compileOnly).returns.resolves.toBeVoid()
    expectTypeOf(db.withSchema('archive')).toEqualTypeOf<Kysely<DB>>()
    const extra = db.withTables<{ extra: { x: number } }>().selectFrom('extra').select('x')
    expectTypeOf<Awaited<ReturnType<typeof extra.execute>>>().toEqualTypeOf<{ x: number }[]>()
  })

  it('takes a scope whose sessions hold Kysely connections', () => {
    expectTypeOf(scopedKysely).parameter(0).toMatchTypeOf<{
      getSession(): { use: (fn: (c: DatabaseConnection) => Promise<unknown>) => Promise<unknown> }
    }>()
  })
})
