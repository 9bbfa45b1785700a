/**
 * Suite 2: an HTTP route that never touches the database, in each framework,
 * with our middleware, with a bare AsyncLocalStorage.run middleware (the
 * floor of any design built on AsyncLocalStorage) and with no middleware; on
 * Node 20 and Node 24. A request that never queries must check nothing out:
 * the scoped server is asked afterwards.
 */
import type { Framework } from '../apps/http.ts'
import { interleave, type Run } from '../lib/http-load.ts'
import { nodeVersion } from '../lib/machine.ts'
import { Server } from '../lib/server.ts'
import { median, num, ratio, spread, table } from '../lib/stats.ts'
import type { Context, SuiteResult, Target } from '../lib/suite.ts'

export const frameworks: Framework[] = ['hono', 'fastify', 'express']

const labels: Record<string, string> = {
  none: 'no middleware',
  als: 'bare `als.run()` middleware',
  scoped: '`scopedSession` (@scoped)',
  'als-fetch': 'bare `als.run()` around `app.fetch` (Hono only)',
  'scoped-fetch': '`scopedFetch(app)` (@scoped, Hono only)',
  'als-hooks': 'bare `als.run()` + the hooks the guarantees need, no-op (floor)',
}

/**
 * The variants of each framework: Hono also has the fetch-handler entry, and
 * its floor (a bare `als.run()` around `app.fetch`). Fastify and Express also
 * have `als-hooks`: a bare `als.run()` middleware plus, as no-ops, the
 * framework hooks that committing before the write and hearing a client leave
 * need (Fastify: an `onSend` hook and a `'close'` listener; Express:
 * subscribers on the router's tracing channel). It is what the framework
 * charges for them, apart from anything of ours; Hono's middleware needs no
 * hook beyond `await next()`.
 */
const variantsOf = (framework: Framework): string[] =>
  framework === 'hono'
    ? ['none', 'als', 'scoped', 'als-fetch', 'scoped-fetch']
    : ['none', 'als', 'scoped', 'als-hooks']

/** What the scoped servers said after their runs: acquired nothing, pool empty. */
export interface HoldsNothing {
  framework: Framework
  variant: string
  node: string
  requests: number
  acquired: number
  poolTotal: number
}

export async function httpNoDb(
  ctx: Context,
): Promise<SuiteResult & { holdsNothing: HoldsNothing[] }> {
  const nodes = [ctx.node20, ...(ctx.node24 ? [ctx.node24] : [])]
  const sections: string[] = []
  const targets: Target[] = []
  const holdsNothing: HoldsNothing[] = []
  const load = {
    path: '/hello',
    connections: 50,
    duration: ctx.quick ? 1 : 2.5,
    warmup: ctx.quick ? 0.5 : 1,
    rounds: ctx.quick ? 2 : 4,
    log: ctx.log,
  }
  for (const node of nodes) {
    const version = nodeVersion(node)
    const is24 = version.startsWith('v24')
    sections.push(`### Node ${version}\n`)
    for (const framework of frameworks) {
      ctx.log(`suite 2: ${framework} on Node ${version}, no database`)
      const servers: Server[] = []
      const variants = variantsOf(framework)
      try {
        for (const variant of variants) {
          servers.push(
            await Server.start(`${framework} ${variant}`, {
              bundle: ctx.bundles.http,
              node,
              config: { framework, variant, url: ctx.url, poolMax: 10 },
            }),
          )
        }
        const runs = await interleave(servers, load)
        const all = servers.map((s) => runs.get(s)!)
        const [none, als] = all as [Run[], Run[]]
        const rps = (rs: Run[]) => rs.map((r) => r.rps)
        const cpu = (rs: Run[]) => rs.map((r) => r.cpu)
        const isScoped = (v: string) => v.startsWith('scoped')
        const rows = variants.map((v, i) => {
          const rs = all[i]!
          return [
            labels[v]!,
            spread(rps(rs), 0),
            v === 'none' ? '—' : ratio(rps(rs), rps(none)).text,
            isScoped(v)
              ? `**${ratio(rps(rs), rps(als)).text}**`
              : v === 'als-hooks'
                ? ratio(rps(rs), rps(als)).text
                : '—',
            spread(cpu(rs), 1),
            v === 'none' ? '—' : num(median(cpu(rs)) - median(cpu(none)), 1),
            isScoped(v) || v === 'als-hooks' ? ratio(cpu(rs), cpu(als)).text : '—',
            `${num(median(rs.map((r) => r.p50)), 0)} / ${num(median(rs.map((r) => r.p99)), 0)}`,
            String(rs.reduce((n, r) => n + r.errors, 0)),
          ]
        })
        sections.push(
          `**${framework}**\n\n${table(
            [
              'middleware',
              'req/s, median [min–max]',
              'vs none',
              'vs bare ALS',
              'server CPU µs/req',
              'added CPU µs/req',
              'CPU vs bare ALS',
              'latency p50 / p99 ms',
              'errors',
            ],
            rows,
          )}\n`,
        )
        for (let i = 2; i < variants.length; i++) {
          if (!isScoped(variants[i]!)) continue
          const scoped = all[i]!
          // The middleware keeps its target names; the fetch entry's say which one they are.
          const which = variants[i] === 'scoped' ? '' : ` (${variants[i]})`
          const vsAls = ratio(rps(scoped), rps(als))
          const hooks = variants.indexOf('als-hooks')
          const vsHooks =
            hooks >= 0
              ? `; ${ratio(rps(scoped), rps(all[hooks]!)).text} of the hooks' floor (which is ${
                  ratio(rps(all[hooks]!), rps(als)).text
                } of bare ALS)`
              : ''
          targets.push({
            name: `${framework}${which}, no database, Node ${version}: vs bare ALS`,
            goal: '≥ 0.97 × bare-ALS middleware throughput',
            figure: `${vsAls.text}; CPU/req ${ratio(cpu(scoped), cpu(als)).text} of bare ALS${vsHooks}`,
            met: vsAls.value >= 0.97,
          })
          if (is24) {
            const vsNone = ratio(rps(scoped), rps(none))
            // The fetch entry's own floor: a bare als.run() around app.fetch.
            const floor = variants.indexOf('als-fetch')
            const vsFloor =
              variants[i] === 'scoped-fetch' && floor >= 0
                ? `; ${ratio(rps(scoped), rps(all[floor]!)).text} of bare ALS around fetch`
                : ''
            targets.push({
              name: `${framework}${which}, no database, Node ${version}: vs no middleware`,
              goal: '≥ 0.95 × bare framework throughput (Node 24)',
              figure: `${vsNone.text}; CPU/req ${ratio(cpu(scoped), cpu(none)).text} of bare${vsFloor}`,
              met: vsNone.value >= 0.95,
            })
          }
          const check = await servers[i]!.ask('check')
          holdsNothing.push({
            framework,
            variant: variants[i]!,
            node: version,
            requests: scoped.reduce((n, r) => n + r.requests, 0),
            acquired: check.acquired as number,
            poolTotal: check.poolTotal as number,
          })
        }
      } finally {
        await Promise.all(servers.map((s) => s.stop()))
      }
    }
  }
  const markdown = [
    `\`GET /hello\` answering \`{"hello":"world"}\`; autocannon in the runner process, ${load.connections}`,
    `connections, ${load.rounds} interleaved rounds of ${load.duration} s per server after ${load.warmup} s of`,
    'warm-up; each server in its own process (`NODE_ENV=production`, bundled by esbuild, plain node).',
    'The scoped servers have a real scope over a real pg pool that no route uses. Ratios are',
    'medians over medians, [range of the per-round ratios]. On this 2-core machine the load generator,',
    'the server and other jobs compete for CPU, so server CPU µs per request is the steadier figure.',
    '',
    ...sections,
  ].join('\n')
  return {
    file: '2-http-no-db.md',
    title: 'HTTP, no database',
    markdown,
    targets,
    holdsNothing,
  }
}
