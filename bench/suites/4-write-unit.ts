/**
 * Suite 4: `POST /orders`, an order and its three items inserted in one
 * transaction — hand-written BEGIN/COMMIT, scopedPool, Kysely, scopedKysely,
 * MikroORM.
 */
import { newOrder } from '../apps/schema.ts'
import type { Context } from '../lib/suite.ts'
import { type DbRuns, dbTable, dbTargets, runDbSuite, type Variant } from './db-http.ts'

export const writeVariants: Variant[] = [
  {
    variant: 'hand-tx',
    label: 'hand-written `connect()` / BEGIN / 2 INSERTs / COMMIT / `release()`',
  },
  { variant: 'hand-tx+als', label: 'the same hand-written unit under bare `als.run()`' },
  {
    variant: 'scoped-auto',
    label: "`scopedPool`, `'auto'`",
    against: 'hand-tx',
    floor: 'hand-tx+als',
  },
  {
    variant: 'scoped-auto-pipelined',
    label: "`scopedPool`, `'auto'`, pool `pipeline: true`",
    against: 'hand-tx',
    floor: 'hand-tx+als',
    min: 0.97,
  },
  { variant: 'kysely-tx', label: 'plain Kysely, `db.transaction()` per request' },
  {
    variant: 'scoped-kysely',
    label: "`scopedKysely`, `'auto'`",
    against: 'kysely-tx',
  },
  {
    variant: 'scoped-kysely-pipelined',
    label: "`scopedKysely`, `'auto'`, pool `pipeline: true`",
    against: 'kysely-tx',
  },
  { variant: 'mikro-rc', label: 'MikroORM `RequestContext`, `em.create()` + `em.flush()`' },
  {
    variant: 'scoped-mikro',
    label: "`@scoped/mikro-orm`, `'auto'`, `em.create()` + `em.flush()`",
    against: 'mikro-rc',
  },
  {
    variant: 'scoped-mikro-none',
    label: "`@scoped/mikro-orm`, `transaction: 'none'`, `em.create()` + `em.flush()`",
    against: 'mikro-rc',
  },
]

export async function writeUnit(ctx: Context) {
  const runs: DbRuns = await runDbSuite(ctx, 'suite 4 (one write unit)', writeVariants, {
    path: '/orders',
    method: 'POST',
    body: JSON.stringify(newOrder),
  })
  const markdown = [
    '`POST /orders` with a JSON order of three items: `INSERT INTO orders … RETURNING id`, then one',
    'multi-row `INSERT INTO order_items`, in one transaction (MikroORM: `em.create()` with the items',
    'collection and `em.flush()`, which sends the same two INSERTs in its own transaction). Same',
    'setup as suite 3: Hono, pool max 10, 50 connections, one process per variant, interleaved.',
    "`@scoped/mikro-orm`, `'auto'` flushes into the session's transaction (BEGIN/COMMIT sent by the",
    "driver); with `transaction: 'none'`, `em.flush()` opens its own, as under RequestContext.",
    '',
    dbTable(runs),
  ].join('\n')
  return {
    file: '4-write-unit.md',
    title: 'HTTP, one write unit',
    markdown,
    targets: dbTargets(`one write unit, Node ${ctx.node20Version}`, runs),
    runs,
  }
}
