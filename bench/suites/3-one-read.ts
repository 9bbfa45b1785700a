/**
 * Suite 3: `GET /orders/:id`, one read by primary key, pool max 10, 50
 * connections — hand-written pg, scopedPool, Kysely, scopedKysely, MikroORM.
 */
import type { Context } from '../lib/suite.ts'
import { type DbRuns, dbTable, dbTargets, runDbSuite, type Variant } from './db-http.ts'

export const readVariants: Variant[] = [
  { variant: 'pool-query', label: 'hand-written `pool.query()`' },
  { variant: 'pool-query+als', label: 'hand-written `pool.query()` under bare `als.run()`' },
  { variant: 'connect', label: 'hand-written `connect()` + try/finally `release()`' },
  { variant: 'hand-tx', label: 'hand-written `connect()` / BEGIN / query / COMMIT / `release()`' },
  {
    variant: 'hand-tx+als',
    label: 'hand-written BEGIN / query / COMMIT under bare `als.run()`',
  },
  {
    variant: 'scoped-none',
    label: "`scopedPool`, `transaction: 'none'`",
    against: 'pool-query',
    floor: 'pool-query+als',
    min: 0.95,
  },
  {
    variant: 'scoped-none-idle',
    label: "`scopedPool`, `transaction: 'none'`, `release: 'idle'`",
    against: 'pool-query',
    floor: 'pool-query+als',
    min: 0.95,
  },
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
  { variant: 'scoped-kysely', label: "`scopedKysely`, `'auto'`", against: 'kysely-tx' },
  {
    variant: 'scoped-kysely-pipelined',
    label: "`scopedKysely`, `'auto'`, pool `pipeline: true`",
    against: 'kysely-tx',
  },
  { variant: 'mikro-rc', label: 'MikroORM `RequestContext` (`em.fork()` per request)' },
  {
    variant: 'mikro-rc-tx',
    label: 'MikroORM `RequestContext`, the read in `em.transactional()` (BEGIN/COMMIT)',
  },
  {
    variant: 'scoped-mikro',
    label: "`@scoped/mikro-orm`, `'auto'`",
    against: 'mikro-rc-tx',
  },
  {
    variant: 'scoped-mikro-none',
    label: "`@scoped/mikro-orm`, `transaction: 'none'`",
    against: 'mikro-rc',
  },
]

/** On Node 24 (no AsyncLocalStorage promise hooks): pg only, to keep the run short. */
const node24Variants = [
  'pool-query',
  'pool-query+als',
  'hand-tx',
  'hand-tx+als',
  'scoped-none',
  'scoped-none-idle',
  'scoped-auto-pipelined',
]

export async function oneRead(ctx: Context) {
  const load = { path: '/orders/42' }
  const runs: DbRuns = await runDbSuite(ctx, 'suite 3 (one read)', readVariants, load)
  let runs24: DbRuns | undefined
  if (ctx.node24) {
    const subset = readVariants.filter((v) => node24Variants.includes(v.variant))
    runs24 = await runDbSuite(ctx, 'suite 3 (one read, Node 24)', subset, load, ctx.node24)
  }
  const markdown = [
    '`GET /orders/42`: one `SELECT … WHERE id = $1` on a table of 10 000 orders, answered as JSON,',
    'in Hono on @hono/node-server. Pool max 10, autocannon with 50 connections; each variant in its',
    'own server process (`NODE_ENV=production`, esbuild bundle, plain node), all loaded in',
    'interleaved rounds. The hand-written and plain-library variants have no middleware (the',
    '`under bare als.run()` rows: the same code under a one-line AsyncLocalStorage middleware, the',
    'floor of any design built on it); ours run under `scopedSession`; MikroORM under',
    "`RequestContext.create(orm.em, next)`. MikroORM's read is autocommit (no transaction), like",
    "`'none'`: the like-for-like row is `@scoped/mikro-orm` with `transaction: 'none'` (autocommit",
    "on the session's connection). `@scoped/mikro-orm`, `'auto'` and the other `'auto'` variants",
    "wrap the read in BEGIN/COMMIT; it is compared with the `em.transactional()` row, MikroORM's",
    'own read in a transaction (what BEGIN/COMMIT cost MikroORM through knex).',
    '',
    `### Node ${ctx.node20Version}`,
    '',
    dbTable(runs),
    ...(runs24
      ? ['', `### Node ${ctx.node24Version} (pg variants only)`, '', dbTable(runs24)]
      : ['', `(No Node 24: ${ctx.node24Why})`]),
  ].join('\n')
  return {
    file: '3-one-read.md',
    title: 'HTTP, one read',
    markdown,
    targets: [
      ...dbTargets(`one read, Node ${ctx.node20Version}`, runs),
      ...(runs24 ? dbTargets(`one read, Node ${ctx.node24Version}`, runs24) : []),
    ],
    runs,
    runs24,
  }
}
