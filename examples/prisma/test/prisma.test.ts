/**
 * The ORM suite (test/orm/suite.ts) with Prisma 7 over @prisma/adapter-pg and
 * the recipe's ScopedPrismaPool (docs/prisma.md), plus Prisma's own
 * `$transaction` inside a session.
 */
import { PrismaPg } from '@prisma/adapter-pg'
import { createScope } from '@scoped/core'
import { pgDriver } from '@scoped/pg'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { committedRows, uniqueAppName } from '../../../test/foundation/support.ts'
import { NOTES_DDL, type OrmHarness, ormSuite } from '../../../test/orm/suite.ts'
import { independentQuery, testDatabase } from '../../../test/support/db.ts'
import { ScopedPrismaPool } from '../src/scoped-prisma-pool.ts'
import { loadPrismaClient } from './prisma-client.ts'

async function connect(url: string, max: number, applicationName: string) {
  const { PrismaClient } = await loadPrismaClient()
  const pool = new pg.Pool({ connectionString: url, max, application_name: applicationName })
  const scope = createScope({ driver: pgDriver(pool), name: 'prisma', default: false })
  const prisma = new PrismaClient({ adapter: new PrismaPg(new ScopedPrismaPool(scope, pool)) })
  return { pool, scope, prisma }
}

const harness: OrmHarness = {
  name: 'prisma',
  async fixture(url, { max, applicationName }) {
    const { pool, scope, prisma } = await connect(url, max, applicationName)
    return {
      scope,
      insert: async (v) => {
        await prisma.note.create({ data: { v } })
      },
      failingStatement: () => prisma.$executeRawUnsafe('SELECT 1 / 0'),
      pidAndSleep: async (seconds) => {
        // pg_sleep in FROM: its void result is never a column Prisma has to read.
        const rows: { pid: number }[] = await prisma.$queryRawUnsafe(
          'SELECT pg_backend_pid() AS pid FROM pg_sleep($1)',
          seconds,
        )
        return rows[0]!.pid
      },
      pool: () => ({ total: pool.totalCount, idle: pool.idleCount, waiting: pool.waitingCount }),
      close: async () => {
        await prisma.$disconnect()
        await scope.close()
      },
    }
  },
}

describe('Prisma over @prisma/adapter-pg, routed by ScopedPrismaPool', () => ormSuite(harness))

describe("Prisma's own $transaction inside a session", () => {
  let url: string
  let c: Awaited<ReturnType<typeof connect>>
  beforeAll(async () => {
    url = await testDatabase('prisma_transaction')
    await independentQuery(url, NOTES_DDL)
    c = await connect(url, 2, uniqueAppName('prisma'))
  })
  afterAll(async () => {
    await c.prisma.$disconnect()
    await c.scope.close()
  })
  const values = async () =>
    (await committedRows<{ v: string }>(url, 'SELECT v FROM notes ORDER BY id')).map((r) => r.v)

  it('is a savepoint in the unit of work: a throw undoes its writes only; the rest commits at the end', async () => {
    await c.scope.run(async () => {
      await c.prisma.note.create({ data: { v: 'outer' } })
      await expect(
        c.prisma.$transaction(async (tx: any) => {
          await tx.note.create({ data: { v: 'interactive-thrown' } })
          throw new Error('undo')
        }),
      ).rejects.toThrow('undo')
      await c.prisma.$transaction([
        c.prisma.note.create({ data: { v: 'batch-1' } }),
        c.prisma.note.create({ data: { v: 'batch-2' } }),
      ])
      // Nothing is committed before the scope ends: $transaction did not COMMIT the request's work.
      expect(await values()).toEqual([])
    })
    const rows = await committedRows<{ v: string; txid: string }>(
      url,
      'SELECT v, txid FROM notes ORDER BY id',
    )
    expect(rows.map((r) => r.v)).toEqual(['outer', 'batch-1', 'batch-2'])
    expect(new Set(rows.map((r) => r.txid)).size).toBe(1)
    expect(c.pool.totalCount).toBe(c.pool.idleCount)
  })

  it('outside any scope Prisma works as usual, on the real pool', async () => {
    await independentQuery(url, 'TRUNCATE notes')
    await c.prisma.note.create({ data: { v: 'plain' } })
    await c.prisma.$transaction(async (tx: any) => {
      await tx.note.create({ data: { v: 'plain-tx' } })
    })
    expect(await values()).toEqual(['plain', 'plain-tx'])
    expect(c.pool.totalCount).toBe(c.pool.idleCount)
  })
})
