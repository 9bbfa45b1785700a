/**
 * Suite 6: memory kept per request. Each adapter's server (with --expose-gc)
 * serves a one-read route through scopedSession + scopedPool; the heap is read
 * after a full gc once N₁ requests were served and again after N₂; the
 * difference per request is what a request leaves behind.
 */
import { send } from '../lib/http-load.ts'
import { Server } from '../lib/server.ts'
import { num, table } from '../lib/stats.ts'
import type { Context, SuiteResult, Target } from '../lib/suite.ts'
import { frameworks } from './2-http-no-db.ts'

const TARGET_BYTES = 50

export async function memory(ctx: Context): Promise<SuiteResult> {
  const first = ctx.quick ? 2_000 : 20_000
  const total = ctx.quick ? 20_000 : 200_000
  const rows: string[][] = []
  const targets: Target[] = []
  const load = { path: '/orders/42', connections: 50 }
  for (const framework of frameworks) {
    ctx.log(`suite 6: ${framework}, ${total} requests`)
    const server = await Server.start(`${framework} memory`, {
      bundle: ctx.bundles.http,
      node: ctx.node20,
      config: { framework, variant: 'scoped-auto', url: ctx.url, poolMax: 10 },
      flags: ['--expose-gc'],
    })
    try {
      let errors = await send(server, load, first)
      const h1 = (await server.ask('heap')).heapUsed as number
      errors += await send(server, load, total - first)
      const h2 = (await server.ask('heap')).heapUsed as number
      const perRequest = (h2 - h1) / (total - first)
      rows.push([
        framework,
        `${num(h1 / 2 ** 20, 2)} MiB`,
        `${num(h2 / 2 ** 20, 2)} MiB`,
        num(perRequest, 1),
        String(errors),
      ])
      targets.push({
        name: `memory per request, ${framework}`,
        goal: `< ${TARGET_BYTES} bytes retained per request`,
        figure: `${num(perRequest, 1)} bytes (${first} → ${total} requests)`,
        met: perRequest < TARGET_BYTES && errors === 0,
      })
    } finally {
      await server.stop()
    }
  }
  const markdown = [
    `Route \`GET /orders/42\` through \`scopedSession\` + \`scopedPool\` (\`'auto'\`, pool max 10), 50`,
    `connections, Node 20 with \`--expose-gc\`. Heap used after three \`gc()\` calls, once ${first}`,
    `requests were served and again after ${total}; bytes per request = difference / ${total - first}.`,
    'A negative figure means the heap shrank (JIT and pool warm-up done in the first part).',
    '',
    table(
      [
        'adapter',
        `heap after ${first}`,
        `heap after ${total}`,
        'bytes retained per request',
        'errors',
      ],
      rows,
    ),
  ].join('\n')
  return { file: '6-memory.md', title: 'Memory per request', markdown, targets }
}
