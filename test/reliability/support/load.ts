/**
 * The load generator: `total` requests over `concurrency` client connections,
 * each of a kind drawn from a seeded mix, and what became of each one, on
 * both sides of the socket.
 *
 * Per-request state lives in typed arrays sized once, so the load itself does
 * not grow the heap while the soak measures it.
 */
import http from 'node:http'
import type { Kind } from './apps.ts'

/** The soak mix of the brief: 70 % success, 10 % thrown, 5 % 5xx, 10 % client abort, 5 % handler timeout. */
export const soakMix: [Kind, number][] = [
  ['ok', 70],
  ['throw', 10],
  ['fail5xx', 5],
  ['abort', 10],
  ['timeout', 5],
]

/** Client side: status received, or one of these. */
export const ABORTED = -1 // the client destroyed the request (a planned abort)
export const NET_ERROR = -2 // the connection failed without the client asking
/** Server side: the response closed without its headers going out. */
export const NO_HEADERS = -1

/**
 * Which units the server saw commit (from `afterCommit`), per load: a flag per
 * request in a typed array, found by the id's prefix.
 */
export class CommitLedger {
  readonly #loads: [prefix: string, flags: Uint8Array][] = []

  track(prefix: string, total: number): Uint8Array {
    const flags = new Uint8Array(total)
    this.#loads.push([prefix, flags])
    return flags
  }

  note(id: string): void {
    for (const [prefix, flags] of this.#loads) {
      if (!id.startsWith(prefix)) continue
      const i = Number(id.slice(prefix.length))
      if (Number.isInteger(i) && i >= 0 && i < flags.length) flags[i] = 1
    }
  }
}

export interface LoadOptions {
  port: number
  total: number
  concurrency: number
  mix: [Kind, number][]
  seed: number
  /** Database sleep of `slow` units, ms. */
  slowMs?: number
  /** Called every `every` completed requests (e.g. to sample memory). */
  progress?: { every: number; fn: (done: number) => void | Promise<void> }
  /** Id prefix, so several loads can share a table. */
  prefix?: string
  /** Stop issuing new requests when this aborts. */
  signal?: AbortSignal
  /** Where the app notes the units that committed (see `AppOptions.onCommit`). */
  ledger?: CommitLedger
}

export interface LoadResult {
  kinds: Kind[]
  /** Status the client received, ABORTED, NET_ERROR, or 0 if never sent. */
  client: Int16Array
  /** Status whose headers the server sent, NO_HEADERS, or 0 if it never saw the request. */
  server: Int16Array
  /** When each request started (`performance.now()`), and how long it took, ms. */
  startedAt: Float64Array
  durationMs: Float64Array
  /** Failure reasons (5xx bodies and socket errors) → count. */
  reasons: Map<string, number>
  /** 1 where the server saw the unit commit (with a ledger), else 0. */
  committedByServer: Uint8Array | undefined
  /** The grouped failure reason of request `i`, if it failed. */
  reasonAt(i: number): string | undefined
  /** Failures whose body said the error was connection-level. */
  fatalFailures: number
  /** How many were sent. */
  sent: number
  elapsedMs: number
  idOf(i: number): string
}

/** mulberry32: small, seeded, reproducible. */
export function random(seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

function pick(mix: [Kind, number][], r: number): Kind {
  const sum = mix.reduce((s, [, w]) => s + w, 0)
  let x = r * sum
  for (const [k, w] of mix) {
    if (x < w) return k
    x -= w
  }
  return mix[mix.length - 1]![0]
}

/** Reasons are grouped without ids, pids and numbers, so a map of them stays small. */
export function reasonOf(text: string): string {
  return text
    .replace(/\d+(\.\d+)?/g, 'N')
    .replace(/'[^']*'/g, "'…'")
    .slice(0, 160)
}

/** Server-side bookkeeping: which status went out for each request id (`<prefix><index>`). */
export function watchResponses(server: http.Server, prefix: string, out: Int16Array): () => void {
  const onRequest = (req: http.IncomingMessage, res: http.ServerResponse) => {
    const m = /^\/unit\/[a-z0-9]+\/([^/?]+)/.exec(req.url ?? '')
    if (!m || !m[1]!.startsWith(prefix)) return
    const i = Number(m[1]!.slice(prefix.length))
    if (!Number.isInteger(i) || i < 0 || i >= out.length) return
    res.on('close', () => {
      out[i] = res.headersSent ? res.statusCode : NO_HEADERS
    })
  }
  server.prependListener('request', onRequest)
  return () => server.off('request', onRequest)
}

/** Run the load against `port`; `server` (when in this process) records what it sent back. */
export async function runLoad(
  server: http.Server | undefined,
  o: LoadOptions,
): Promise<LoadResult> {
  const rand = random(o.seed)
  const prefix = o.prefix ?? 'u'
  const kinds = Array.from({ length: o.total }, () => pick(o.mix, rand()))
  const abortAt = Array.from({ length: o.total }, () => Math.floor(rand() * 50))
  const sleepOf = Array.from({ length: o.total }, () => Math.floor(rand() * 40))
  const client = new Int16Array(o.total)
  const serverSide = new Int16Array(o.total)
  const startedAt = new Float64Array(o.total)
  const durationMs = new Float64Array(o.total)
  const reasons = new Map<string, number>()
  let fatalFailures = 0
  const committedByServer = o.ledger?.track(prefix, o.total)
  const unwatch = server ? watchResponses(server, prefix, serverSide) : () => {}
  const agent = new http.Agent({ keepAlive: true, maxSockets: o.concurrency })
  const reasonList: string[] = []
  const reasonIndex = new Map<string, number>()
  const reasonOfRequest = new Uint16Array(o.total)
  const note = (i: number, reason: string) => {
    reasons.set(reason, (reasons.get(reason) ?? 0) + 1)
    let k = reasonIndex.get(reason)
    if (k === undefined) {
      k = reasonList.push(reason)
      reasonIndex.set(reason, k)
    }
    reasonOfRequest[i] = k
  }

  const one = (i: number): Promise<void> =>
    new Promise((resolve) => {
      const kind = kinds[i]!
      const sleep = kind === 'abort' ? sleepOf[i]! : kind === 'slow' ? (o.slowMs ?? 100) : 0
      const started = performance.now()
      startedAt[i] = started
      let settled = false
      let aborting = false
      const done = (status: number, reason?: string) => {
        if (settled) return
        settled = true
        client[i] = status
        durationMs[i] = performance.now() - started
        if (reason !== undefined) note(i, reason)
        resolve()
      }
      const req = http.request({
        host: '127.0.0.1',
        port: o.port,
        method: 'POST',
        path: `/unit/${kind}/${prefix}${i}${sleep > 0 ? `?sleep=${sleep}` : ''}`,
        headers: { 'content-length': 0 },
        // A planned abort destroys its socket, so it gets one of its own.
        agent: kind === 'abort' ? false : agent,
      })
      req.on('error', (e) => {
        if (aborting) done(ABORTED)
        else done(NET_ERROR, `client: ${reasonOf(e.message)}`)
      })
      req.on('response', (res) => {
        const status = res.statusCode ?? 0
        if (status < 500) {
          res.resume()
          res.on('end', () => done(res.complete ? status : aborting ? ABORTED : NET_ERROR))
        } else {
          let body = ''
          res.setEncoding('utf8')
          res.on('data', (d) => {
            body += d
          })
          res.on('end', () => {
            let why = `${status}`
            try {
              const b = JSON.parse(body) as { code?: string; message?: string; fatal?: boolean }
              if (b.fatal) fatalFailures++
              why = `${status} ${b.code ?? ''}: ${reasonOf(b.message ?? '')}`
            } catch {
              why = `${status} ${reasonOf(body)}`
            }
            done(status, why)
          })
        }
        res.on('error', () => done(aborting ? ABORTED : NET_ERROR))
        res.on('aborted', () => done(aborting ? ABORTED : NET_ERROR))
      })
      req.end()
      if (kind === 'abort') {
        setTimeout(() => {
          if (settled) return
          aborting = true
          req.destroy()
        }, abortAt[i]!)
      }
    })

  const t0 = performance.now()
  let next = 0
  let completed = 0
  const worker = async () => {
    while (next < o.total && !o.signal?.aborted) {
      const i = next++
      await one(i)
      completed++
      if (o.progress && completed % o.progress.every === 0) await o.progress.fn(completed)
    }
  }
  try {
    await Promise.all(Array.from({ length: o.concurrency }, worker))
  } finally {
    agent.destroy()
  }
  const elapsedMs = performance.now() - t0
  // The server's 'close' of the last responses may come a moment after the client saw them.
  unwatchLater(unwatch)
  return {
    kinds,
    client,
    server: serverSide,
    startedAt,
    durationMs,
    reasons,
    committedByServer,
    reasonAt: (i) => (reasonOfRequest[i] ? reasonList[reasonOfRequest[i]! - 1] : undefined),
    fatalFailures,
    sent: next,
    elapsedMs,
    idOf: (i) => `${prefix}${i}`,
  }
}

function unwatchLater(unwatch: () => void): void {
  setTimeout(unwatch, 2_000).unref()
}
