/**
 * The holders page (`/scoped`) as an operator sees it: the app is started as
 * `pnpm start` starts it, a slow report holds one of its connections, and the
 * page is opened in a real headless Chromium (Debian's `chromium`, driven by
 * playwright-core). What is checked is what the browser rendered: the route in
 * the holders table while it holds the connection, and gone after the page
 * reloaded itself once the request finished; `/metrics` agrees both times.
 *
 * A screenshot of the page with the holder is written to
 * `.tmp/screenshots/hono-scoped-page.png` (its path is printed).
 */
import { existsSync, mkdirSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import pg from 'pg'
import { type Browser, chromium, type Page } from 'playwright-core'
import { afterAll, beforeAll, describe, expect, it, onTestFinished } from 'vitest'
import { backends, independentQuery, testDatabase } from '../../../test/support/db.ts'
import { type ExampleProcess, startExample } from '../../shared/test/child.ts'

// Debian's chromium; `.ci/run` installs it when it is missing. CHROMIUM_PATH points elsewhere.
const chromiumPath = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium'
// Headless, and nothing that reaches for the network on its own (updates, sync, QUIC probes):
// the only pages it loads are the app's, on 127.0.0.1.
const chromiumArgs = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
]
const screenshots = fileURLToPath(new URL('../../../.tmp/screenshots/', import.meta.url))
const route = 'GET /orders/summary'

/** Poll `check` until it returns something other than undefined (the app's state, not a sleep). */
async function until<T>(what: string, check: () => Promise<T | undefined>, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = await check()
    if (value !== undefined) return value
    if (Date.now() > deadline)
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 50))
  }
}

/** The holders table as the browser shows it: one array of cell texts per row. */
async function holderRows(page: Page): Promise<string[][]> {
  const rows = await page.locator('table.holders tbody tr').all()
  return Promise.all(rows.map((row) => row.locator('td').allInnerTexts()))
}

describe('hono-app: /scoped in a headless browser', () => {
  let databaseUrl: string
  let app: ExampleProcess
  let base: string
  let browser: Browser
  let page: Page

  beforeAll(async () => {
    if (!existsSync(chromiumPath)) {
      throw new Error(
        `no Chromium at ${chromiumPath}: install Debian's package (apt-get install chromium; .ci/run does it) or set CHROMIUM_PATH`,
      )
    }
    databaseUrl = await testDatabase('example_hono_scoped_page')
    app = startExample('hono-app', { DATABASE_URL: databaseUrl, PORT: '0' })
    const [, url] = await app.waitFor(/orders service \(hono\) listening on (http:\/\/\S+)/)
    base = url as string
    browser = await chromium.launch({ executablePath: chromiumPath, args: chromiumArgs })
    page = await browser.newPage({ viewport: { width: 1100, height: 800 } })
  }, 60_000)

  afterAll(async () => {
    await browser?.close()
    await app?.stop()
  })

  it('lists the slow request while it holds a connection, and drops it once it finished', async () => {
    // The report's SELECT waits for the ACCESS EXCLUSIVE lock this transaction holds on `orders`:
    // the request holds its connection, in the database, exactly until the test lets it go.
    const locker = new pg.Client({ connectionString: databaseUrl })
    await locker.connect()
    // Also when an assertion fails: the open request would keep SIGTERM waiting.
    onTestFinished(() => locker.end())
    await locker.query('BEGIN')
    await locker.query('LOCK TABLE orders IN ACCESS EXCLUSIVE MODE')
    const slow = fetch(`${base}/orders/summary`)
    await until('the report to wait on the lock', async () => {
      const waiting = await independentQuery(
        databaseUrl,
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'orders-app' AND wait_event_type = 'Lock'",
      )
      return waiting.length > 0 ? true : undefined
    })
    // The chart draws the sampler's figures (one sample a second): wait for one that saw it.
    await until('a pool sample with the connection in use', async () => {
      const snap = (await (await fetch(`${base}/scoped.json`)).json()) as {
        samples: { used: number }[]
      }
      return snap.samples.at(-1)?.used === 1 ? true : undefined
    })

    const res = await page.goto(`${base}/scoped`)
    expect(res?.status()).toBe(200)
    expect(await page.title()).toBe('orders-db: 1 of 10 in use')
    expect(await page.locator('h2', { hasText: 'Who holds the connections' }).textContent()).toBe(
      'Who holds the connections (1)',
    )
    const rows = await holderRows(page)
    expect(rows).toHaveLength(1)
    const [name, , heldFor, state, site] = rows[0]!
    expect(name).toBe(route)
    expect(heldFor).toMatch(/^\d+(\.\d)? (ms|s)$/)
    expect(state).toBe('querying')
    // captureStacks is on outside production: the site is a frame of the app's code.
    expect(site).toMatch(/examples\/shared\/src\/orders\.ts:\d+/)
    // The chart is drawn: the in-use area and the pool size line.
    await expect(page.locator('figure svg polygon.used').count()).resolves.toBe(1)
    await expect(page.locator('figure svg line.max').count()).resolves.toBe(1)

    mkdirSync(screenshots, { recursive: true })
    const shot = `${screenshots}hono-scoped-page.png`
    await page.screenshot({ path: shot, fullPage: true })
    console.log(`screenshot of /scoped with '${route}' holding a connection: ${shot}`)

    // /metrics says the same: one connection of the 'orders-db' pool in use.
    const during = await (await fetch(`${base}/metrics`)).text()
    expect(during).toMatch(/^# TYPE db_client_connection_count \w+$/m)
    expect(during).toMatch(
      /^db_client_connection_count\{db_client_connection_pool_name="orders-db",db_client_connection_state="used"[^}]*\} 1$/m,
    )

    // Let the report finish: it answers, and commits its (read-only) unit of work.
    await locker.query('COMMIT')
    const done = await slow
    expect(done.status).toBe(200)
    expect(await done.json()).toMatchObject({ orders: 0, revenueCents: 0 })

    // The page reloads itself (meta refresh): wait for a version without the holder.
    await page.locator('p.none').waitFor({ timeout: 10_000 })
    expect(await page.locator('p.none').textContent()).toBe(
      'No session holds a connection right now.',
    )
    expect(await holderRows(page)).toEqual([])
    expect(await page.title()).toBe('orders-db: 0 of 10 in use')

    const after = await (await fetch(`${base}/metrics`)).text()
    expect(after).toMatch(
      /^db_client_connection_count\{db_client_connection_pool_name="orders-db",db_client_connection_state="used"[^}]*\} 0$/m,
    )
    expect(after).toMatch(
      /^db_client_connection_count\{db_client_connection_pool_name="orders-db",db_client_connection_state="idle"[^}]*\} [1-9]\d*$/m,
    )
  })

  it('SIGTERM after the browser closed: the app exits 0 and leaves no backend', async () => {
    await browser.close()
    const { code } = await app.stop('SIGTERM')
    expect(code).toBe(0)
    expect(await backends(databaseUrl, 'orders-app')).toEqual([])
  })
})
