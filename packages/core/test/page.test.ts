/**
 * `@scoped/core/page`: the page shows who holds the connections (escaped), the
 * pool over a bounded window, and reloads itself.
 */
import { afterEach, describe, expect, it } from 'vitest'
import { createScope, type Scope } from '../src/index.ts'
import {
  formatDuration,
  holdersPage,
  type PageSnapshot,
  renderHoldersPage,
} from '../src/page/index.ts'
import { type FakeConn, FakeDriver } from './fake-driver.ts'

const cleanups: (() => unknown)[] = []
afterEach(async () => {
  for (const fn of cleanups.splice(0).reverse()) await fn()
})

function make(driver = new FakeDriver(), opts: Record<string, unknown> = {}) {
  const scope = createScope({ driver, default: false, leakDetectionMs: 0, name: 'web', ...opts })
  cleanups.push(() => scope.close({ timeoutMs: 100 }))
  return scope
}
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
const gate = () => {
  let open!: () => void
  const promise = new Promise<void>((r) => {
    open = r
  })
  return { promise, open }
}

/** Visible text of the holders table's rows: cells separated by `|`. */
function rows(html: string): string[] {
  const body = html.match(/<tbody>(.*)<\/tbody>/s)?.[1] ?? ''
  return [...body.matchAll(/<tr[^>]*>(.*?)<\/tr>/gs)].map((m) =>
    [...m[1]!.matchAll(/<td[^>]*>(.*?)<\/td>/gs)]
      .map((c) => c[1]!.replace(/<pre>.*?<\/pre>/gs, '').replace(/<[^>]+>/g, ''))
      .join('|'),
  )
}

describe('holdersPage', () => {
  it('lists every holder with name, request id, hold time, state and acquisition site', async () => {
    const driver = new FakeDriver(3)
    const scope = make(driver, { captureStacks: true })
    const page = holdersPage(scope)
    cleanups.push(() => page.stop())
    const hold = gate()
    const querying = gate()
    const running = [
      scope.run(
        async () => {
          await scope.getSession().use((c) => driver.query(c, 'SELECT'))
          await hold.promise
        },
        { name: 'GET /orders/:id', requestId: 'req-1' },
      ),
      scope.run(
        async () => {
          await scope.getSession().use(async () => {
            await querying.promise
          })
        },
        { name: 'job:<sync>' },
      ),
    ]
    while (scope.stats().holding < 2) await sleep(2)
    const html = page.html()
    const table = rows(html)
    expect(table).toHaveLength(2)
    const order = table.find((r) => r.startsWith('GET /orders/:id'))!
    expect(order).toMatch(/^GET \/orders\/:id\|req-1\|\d+ ms\|in-transaction\|.*page\.test\.ts/)
    // Names come from requests: they are escaped, never markup.
    const job = table.find((r) => r.startsWith('job:'))!
    expect(job).toMatch(/^job:&lt;sync&gt;\|\|\d+ ms\|querying\|/)
    expect(html).not.toContain('job:<sync>')
    // The full stack is one click away.
    expect(html).toMatch(/<details><summary><code>[^<]*page\.test\.ts[^<]*<\/code><\/summary><pre>/)
    expect(html).toContain('<b>2</b> of 3 in use')
    expect(html).toContain('<meta http-equiv="refresh" content="2">')
    expect(
      page
        .snapshot()
        .holders.map((h) => h.name)
        .sort(),
    ).toEqual(['GET /orders/:id', 'job:<sync>'])
    hold.open()
    querying.open()
    await Promise.all(running)
    expect(rows(page.html())).toEqual([])
    expect(page.html()).toContain('No session holds a connection right now.')
  })

  it('keeps a bounded window of samples, oldest first, that shows the pool filling up', async () => {
    const driver = new FakeDriver(2)
    const scope = make(driver)
    const page = holdersPage(scope, { sampleEveryMs: 5, windowMs: 50 })
    cleanups.push(() => page.stop())
    const hold = gate()
    const running = [1, 2, 3].map(() =>
      scope.run(async () => {
        await scope.getSession().connection()
        await hold.promise
      }),
    )
    await sleep(120)
    const { samples } = page.snapshot()
    expect(samples).toHaveLength(10)
    const times = samples.map((s) => s.at)
    expect(times).toEqual([...times].sort((a, b) => a - b))
    expect(samples[samples.length - 1]).toMatchObject({ used: 2, idle: 0, waiting: 1, max: 2 })
    // In the chart: an area for the connections in use, one for the waiters, the pool size.
    const html = page.html()
    expect(html).toMatch(/<polygon class="used" points="[\d., ]+"\/>/)
    expect(html).toMatch(/<polygon class="waiting" points="[\d., ]+"\/>/)
    expect(html).toMatch(/<line class="max"/)
    expect(html).toContain('<b class="warn">1</b> waiting')
    hold.open()
    await Promise.all(running)
  })

  it('stop() stops sampling', async () => {
    const scope = make()
    const page = holdersPage(scope, { sampleEveryMs: 5, windowMs: 1_000 })
    await sleep(30)
    page.stop()
    const n = page.snapshot().samples.length
    await sleep(30)
    expect(page.snapshot().samples.length).toBe(n)
  })

  it('rejects options that cannot work, naming them', () => {
    const scope = make()
    expect(() => holdersPage(scope, { sampleEveryMs: 0 })).toThrow(/sampleEveryMs/)
    expect(() => holdersPage(scope, { windowMs: 10, sampleEveryMs: 100 })).toThrow(
      /windowMs.*shorter/,
    )
    expect(() => holdersPage({} as Scope<FakeConn>)).toThrow(
      /holdersPage\(scope\): expected a Scope/,
    )
  })
})

describe('renderHoldersPage', () => {
  const base: PageSnapshot = {
    scope: 'main',
    at: Date.UTC(2025, 0, 1, 12, 0, 0),
    stats: {
      name: 'main',
      driver: 'pg',
      open: 3,
      holding: 2,
      inTransaction: 1,
      waiting: 0,
      totals: {
        acquired: 40,
        committed: 35,
        rolledBack: 4,
        destroyed: 1,
        leaks: 1,
        timeouts: 2,
        forced: 0,
      },
      pool: { total: 4, idle: 2, waiting: 0, max: 10 },
    },
    holders: [
      { id: '7', name: 'GET /reports', heldMs: 75_000, state: 'querying', site: 'reports.ts:10:3' },
      { id: '9', name: 'POST /orders', requestId: 'r"9', heldMs: 120, state: 'idle' },
    ],
    samples: [],
    windowMs: 300_000,
    leakDetectionMs: 60_000,
  }

  it('marks holders past leakDetectionMs and says when stacks are off', () => {
    const html = renderHoldersPage(base)
    expect(rows(html)).toEqual([
      'GET /reports||1 min 15 s|querying|reports.ts:10:3',
      'POST /orders|r&quot;9|120 ms|idle|(captureStacks is off)',
    ])
    expect(html).toMatch(/<tr class="leak"[^>]*><td>GET \/reports/)
    expect(html).not.toMatch(/<tr class="leak"[^>]*><td>POST/)
    expect(html).toContain('<b>2</b> of 10 in use · 2 idle')
    expect(html).toContain('<dt>timeouts</dt><dd>2</dd>')
    expect(html).toContain('2025-01-01 12:00:00 UTC')
    expect(html).toContain('(no samples yet)')
  })

  it('refreshSeconds: 0 renders a page that does not reload', () => {
    expect(renderHoldersPage(base, { refreshSeconds: 0 })).not.toContain('http-equiv="refresh"')
    expect(renderHoldersPage(base, { refreshSeconds: 10 })).toContain('content="10"')
    expect(() => renderHoldersPage(base, { refreshSeconds: -1 })).toThrow(/refreshSeconds/)
  })

  it('a driver without pool figures: the scope’s own count, no pool size', () => {
    const html = renderHoldersPage({
      ...base,
      stats: { ...base.stats, pool: undefined, waiting: 3 },
    })
    expect(html).toContain('<b>2</b> in use · <b class="warn">3</b> waiting')
  })

  it("spans the chart over the window, or from a young process's first sample", () => {
    const sample = (agoMs: number, used: number) => ({
      at: base.at - agoMs,
      used,
      idle: 0,
      waiting: 0,
      max: 10,
    })
    const axis = (html: string) => ({
      from: html.match(/<text x="\d+" y="\d+">([^<]*) ago<\/text>/)?.[1],
      caption: html.match(/<figcaption>Last ([^:]*):/)?.[1],
      // The in-use area's first point: where the first sample is drawn.
      firstX: Number(html.match(/<polygon class="used" points="([\d.]+),/)?.[1]),
    })
    // A running process: samples over the whole window.
    const full = Array.from({ length: 300 }, (_, i) => sample((299 - i) * 1_000, i % 3))
    const running = axis(renderHoldersPage({ ...base, samples: full }))
    expect(running).toMatchObject({ from: '5 min', caption: '5 min' })
    // 299 s ago, in 684 px for 300 s: one second (2.3 px) right of the left edge.
    expect(running.firstX).toBeCloseTo(32 + 684 / 300, 0)
    // Started 30 s ago: the chart is those 30 s, its first sample at the left edge.
    const young = [30_000, 20_000, 10_000, 0].map((ago) => sample(ago, 1))
    expect(axis(renderHoldersPage({ ...base, samples: young }))).toEqual({
      from: '30 s',
      caption: '30 s',
      firstX: 32,
    })
    // Started 2 s ago: at least 10 s, so the first samples are not one wide block.
    const newborn = [2_000, 1_000, 0].map((ago) => sample(ago, 1))
    const shown = axis(renderHoldersPage({ ...base, samples: newborn }))
    expect(shown).toMatchObject({ from: '10 s', caption: '10 s' })
    expect(shown.firstX).toBeGreaterThan(500)
    expect(axis(renderHoldersPage(base))).toMatchObject({
      from: '5 min',
      caption: '5 min (no samples yet)',
    })
  })

  it('formats hold times for people', () => {
    expect([
      formatDuration(5),
      formatDuration(1_250),
      formatDuration(61_000),
      formatDuration(3_725_000),
    ]).toEqual(['5 ms', '1.3 s', '1 min 01 s', '62 min 05 s'])
  })
})
