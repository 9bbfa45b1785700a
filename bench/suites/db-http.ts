/**
 * The database HTTP suites (3: one read, 4: one write unit): each variant in
 * its own Hono server process with a pool of 10, loaded interleaved; the
 * figures of each, its ratio to the hand-written (or plain-library) code it
 * replaces, and to MikroORM's RequestContext.
 */
import { interleave, type LoadOptions, type Run } from '../lib/http-load.ts'
import { Server } from '../lib/server.ts'
import { median, num, ratio, spread, table } from '../lib/stats.ts'
import type { Context, Target } from '../lib/suite.ts'

export interface Variant {
  variant: string
  label: string
  /** The variant this one replaces: its ratio is shown, and judged when `min` is set. */
  against?: string
  /** The same hand-written code under a bare AsyncLocalStorage.run: the floor of any ALS design. */
  floor?: string
  min?: number
  goal?: string
}

export interface DbRuns {
  variants: Variant[]
  runs: Map<string, Run[]>
}

export const POOL_MAX = 10

export async function runDbSuite(
  ctx: Context,
  title: string,
  variants: Variant[],
  load: Omit<LoadOptions, 'connections' | 'duration' | 'warmup' | 'rounds'>,
  node: string = ctx.node20,
): Promise<DbRuns> {
  const servers: Server[] = []
  try {
    for (const v of variants) {
      ctx.log(`${title}: starting ${v.variant}`)
      servers.push(
        await Server.start(v.variant, {
          bundle: ctx.bundles.http,
          node,
          config: { framework: 'hono', variant: v.variant, url: ctx.url, poolMax: POOL_MAX },
        }),
      )
    }
    const runs = await interleave(servers, {
      ...load,
      connections: 50,
      duration: ctx.quick ? 1 : 2.5,
      warmup: ctx.quick ? 0.5 : 2,
      rounds: ctx.quick ? 2 : 4,
      hold: true,
      pgCpu: ctx.pgCpu,
      log: ctx.log,
    })
    return { variants, runs: new Map(servers.map((s) => [s.label, runs.get(s)!])) }
  } finally {
    await Promise.all(servers.map((s) => s.stop()))
  }
}

const rps = (rs: Run[]) => rs.map((r) => r.rps)
const cpu = (rs: Run[]) => rs.map((r) => r.cpu)

export function dbTable({ variants, runs }: DbRuns): string {
  const byName = new Map(variants.map((v) => [v.variant, v]))
  const mikro = runs.get('mikro-rc')
  const rows = variants.map((v) => {
    const rs = runs.get(v.variant)!
    const base = v.against ? runs.get(v.against) : undefined
    const floor = v.floor ? runs.get(v.floor) : undefined
    return [
      v.label,
      spread(rps(rs), 0),
      base ? `${ratio(rps(rs), rps(base)).text} (${byName.get(v.against!)!.label})` : '—',
      base ? ratio(cpu(rs), cpu(base)).text : '—',
      floor ? ratio(rps(rs), rps(floor)).text : '—',
      mikro && v.variant !== 'mikro-rc' ? ratio(rps(rs), rps(mikro)).text : '—',
      spread(cpu(rs), 0),
      num(median(rs.map((r) => r.pgCpu)), 0),
      `${num(median(rs.map((r) => r.p50)), 0)} / ${num(median(rs.map((r) => r.p99)), 0)}`,
      String(rs.reduce((n, r) => n + r.errors, 0)),
    ]
  })
  return table(
    [
      'variant',
      'req/s, median [min–max]',
      'req/s ratio vs the code it replaces',
      'CPU/req ratio vs it',
      'req/s vs the same code under bare ALS',
      'req/s vs MikroORM RequestContext',
      'server CPU µs/req',
      'PostgreSQL CPU µs/req',
      'latency p50 / p99 ms',
      'errors',
    ],
    rows,
  )
}

export function dbTargets(suite: string, { variants, runs }: DbRuns): Target[] {
  // Variants measured in this run only (a subset on Node 24).
  const targets: Target[] = []
  const label = (name: string) => variants.find((v) => v.variant === name)?.label ?? name
  for (const v of variants) {
    if (v.min === undefined || !v.against || !runs.has(v.against)) continue
    const r = ratio(rps(runs.get(v.variant)!), rps(runs.get(v.against)!))
    targets.push({
      name: `${suite}: ${v.label}`,
      goal: v.goal ?? `≥ ${v.min} × ${label(v.against)}`,
      figure: `${r.text}; CPU/req ${ratio(cpu(runs.get(v.variant)!), cpu(runs.get(v.against)!)).text}`,
      met: r.value >= v.min,
    })
  }
  const mikro = runs.get('mikro-rc')
  // Only where the suite measures MikroORM (the Node 24 subset of suite 3 does not).
  const withMikro = variants.some((v) => v.variant.includes('mikro'))
  for (const ours of [
    'scoped-kysely',
    'scoped-kysely-pipelined',
    'scoped-auto-pipelined',
    'scoped-mikro',
    'scoped-mikro-none',
  ]) {
    const rs = runs.get(ours)
    if (!rs || !withMikro) continue
    if (!mikro) {
      targets.push({
        name: `${suite}: ${label(ours)} vs MikroORM RequestContext`,
        goal: 'ahead of MikroORM RequestContext',
        figure: 'MikroORM not measured',
        met: undefined,
      })
      continue
    }
    const r = ratio(rps(rs), rps(mikro))
    targets.push({
      name: `${suite}: ${label(ours)} vs MikroORM RequestContext`,
      goal: 'ahead of MikroORM RequestContext (req/s ratio > 1)',
      figure: r.text,
      met: r.value > 1,
    })
  }
  return targets
}

/** Suite 5's table for one DB suite: how long each request held a connection. */
export function holdTable({ variants, runs }: DbRuns): string {
  const rows = variants.map((v) => {
    const rs = runs.get(v.variant)!
    const m = (f: (r: Run) => number | undefined) => {
      const xs = rs.map(f).filter((x): x is number => x !== undefined && Number.isFinite(x))
      return xs.length ? num(median(xs), 3) : '—'
    }
    return [
      v.label,
      m((r) => r.heldMean),
      m((r) => r.heldP99),
      m((r) => r.scopedHeldMean),
      m((r) => r.scopedHeldP99),
      String(Math.max(...rs.map((r) => r.peak ?? 0))),
    ]
  })
  return table(
    [
      'variant',
      'held ms, mean (pool: checkout → release)',
      'held ms, p99 (pool)',
      '`scoped:release` heldMs, mean',
      '`scoped:release` heldMs, p99',
      'peak checked out (pool max 10)',
    ],
    rows,
  )
}
