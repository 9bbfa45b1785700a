/**
 * Load on the bench servers with autocannon, interleaved: every round runs
 * each server once (the order reversed every other round), so drift in the
 * machine's load hits all of them alike. Per run: throughput, latency, the
 * server's CPU time per request (steadier than requests per second on a
 * shared, CPU-bound machine) and PostgreSQL's, and connection hold times.
 */
import autocannon from 'autocannon'
import type { PostgresCpu } from './postgres-cpu.ts'
import type { Server } from './server.ts'
import { mean, quantile } from './stats.ts'

export interface LoadOptions {
  path: string
  method?: 'GET' | 'POST'
  body?: string
  connections: number
  /** Seconds per measured run. */
  duration: number
  /** Seconds of unmeasured load per server before the first round. */
  warmup: number
  rounds: number
  /** Collect connection hold times (the DB suites). */
  hold?: boolean
  pgCpu?: PostgresCpu | undefined
  /** Progress lines go here. */
  log?: (line: string) => void
}

export interface Run {
  rps: number
  p50: number
  p99: number
  /** Server CPU µs per request. */
  cpu: number
  /** PostgreSQL CPU µs per request (NaN when unknown). */
  pgCpu: number
  requests: number
  errors: number
  /** Connection hold times in this run (ms), as the pool saw them. */
  heldMean?: number
  heldP99?: number
  /** As `scoped:release` reported them (scoped variants). */
  scopedHeldMean?: number
  scopedHeldP99?: number
  /** Most connections checked out at once. */
  peak?: number
}

export type Runs = Map<Server, Run[]>

async function fire(server: Server, opts: LoadOptions, seconds: number) {
  return autocannon({
    url: server.url + opts.path,
    method: opts.method ?? 'GET',
    connections: opts.connections,
    duration: seconds,
    ...(opts.body !== undefined && {
      body: opts.body,
      headers: { 'content-type': 'application/json' },
    }),
  })
}

async function measureOnce(server: Server, opts: LoadOptions): Promise<Run> {
  if (opts.hold) await server.ask('hold-start')
  const cpu0 = await server.cpu()
  const pg0 = opts.pgCpu?.read() ?? Number.NaN
  const r = await fire(server, opts, opts.duration)
  const pg1 = opts.pgCpu?.read() ?? Number.NaN
  const cpu1 = await server.cpu()
  const requests = r.requests.total
  const run: Run = {
    rps: requests / (r.duration || opts.duration),
    p50: r.latency.p50,
    p99: r.latency.p99,
    cpu: (cpu1 - cpu0) / requests,
    pgCpu: (pg1 - pg0) / requests,
    requests,
    errors: r.errors + r.timeouts + r.non2xx,
  }
  if (opts.hold) {
    const h = await server.ask('hold')
    const held = h.held as number[]
    const scopedHeld = h.scopedHeld as number[]
    run.heldMean = mean(held)
    run.heldP99 = quantile(held, 0.99)
    if (scopedHeld.length > 0) {
      run.scopedHeldMean = mean(scopedHeld)
      run.scopedHeldP99 = quantile(scopedHeld, 0.99)
    }
    run.peak = h.peak as number
  }
  return run
}

/** Warm every server up, then `rounds` interleaved rounds; the runs of each server, in round order. */
export async function interleave(servers: Server[], opts: LoadOptions): Promise<Runs> {
  for (const s of servers) await fire(s, opts, opts.warmup)
  const runs: Runs = new Map(servers.map((s) => [s, []]))
  for (let round = 0; round < opts.rounds; round++) {
    const order = round % 2 === 0 ? servers : [...servers].reverse()
    for (const s of order) {
      const run = await measureOnce(s, opts)
      runs.get(s)!.push(run)
      opts.log?.(
        `  round ${round + 1}/${opts.rounds} ${s.label}: ${run.rps.toFixed(0)} req/s, ` +
          `${run.cpu.toFixed(0)} µs CPU/req${run.errors ? `, ${run.errors} ERRORS` : ''}`,
      )
    }
  }
  return runs
}

/** Send exactly `amount` requests (the memory suite). */
export async function send(
  server: Server,
  opts: Pick<LoadOptions, 'path' | 'method' | 'connections'>,
  amount: number,
): Promise<number> {
  const r = await autocannon({
    url: server.url + opts.path,
    method: opts.method ?? 'GET',
    connections: opts.connections,
    amount,
  })
  return r.errors + r.timeouts + r.non2xx
}
