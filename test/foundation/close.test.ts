/**
 * Graceful shutdown against a real PostgreSQL: scope.close() refuses new
 * work, waits for the running job to finish (and commit), then ends the
 * pool. At its timeout it destroys what is still held, so shutdown never
 * hangs on a stuck job.
 */
import { createScope, ScopeClosedError } from '@scoped/core'
import { pgDriver } from '@scoped/pg'
import { beforeAll, describe, expect, it } from 'vitest'
import { backends, independentQuery, testDatabase } from '../support/db.ts'
import { committedRows, createTable, gate, testPool, waitFor } from './support.ts'

let url: string

beforeAll(async () => {
  url = await testDatabase('foundation_close')
  await createTable(url, 'jobs')
})

describe('scope.close()', () => {
  it('waits for a running job, which commits, then ends the pool; new work is refused', async () => {
    const t = testPool(url, 'close_wait', { max: 2 })
    const scope = createScope({ driver: pgDriver(t.pool), default: false, name: 'close-wait' })
    const finish = gate()
    let jobDone = false
    const job = scope.runJob(
      async () => {
        await scope.getSession().use((c) => c.query("INSERT INTO jobs (v) VALUES ('running')"))
        await finish.promise
        await scope.getSession().use((c) => c.query("INSERT INTO jobs (v) VALUES ('finished')"))
        jobDone = true
      },
      { name: 'export' },
    )
    await waitFor('the job to hold a connection', () => scope.stats().holding === 1)

    let closed = false
    const closing = scope.close().then(() => {
      closed = true
    })
    await expect(scope.runJob(async () => {}, { name: 'late' })).rejects.toBeInstanceOf(
      ScopeClosedError,
    )
    await expect(scope.run(async () => {})).rejects.toThrow(/scope 'close-wait' is closed/)
    // Still waiting for the job: the pool is alive and the job's backend is there.
    await new Promise((r) => setTimeout(r, 50))
    expect(closed).toBe(false)
    expect(t.pool.ended).toBe(false)

    finish.open()
    await job
    await closing
    expect(jobDone).toBe(true)
    expect(t.pool.ended).toBe(true)
    expect(t.pool.totalCount).toBe(0)
    expect((await committedRows(url, 'SELECT v FROM jobs ORDER BY id')).map((r) => r.v)).toEqual([
      'running',
      'finished',
    ])
    await waitFor('the backends to exit', async () => (await backends(url, t.app)).length === 0)

    const err = await scope.runJob(async () => {}, { name: 'after-close' }).catch((e) => e)
    expect(err).toBeInstanceOf(ScopeClosedError)
    expect(err.message).toContain('runJob()')
    expect(err.message).toContain('Fix:')
    // close() is idempotent.
    await scope.close()
  })

  it('at its timeout destroys the connection of a job that does not finish, and ends the pool', async () => {
    const t = testPool(url, 'close_force', { max: 2 })
    const scope = createScope({
      driver: pgDriver(t.pool),
      default: false,
      name: 'close-force',
      onError: () => {},
    })
    const stuck = gate()
    let signalAborted = false
    const job = scope.runJob(
      async () => {
        const s = scope.getSession()
        s.signal.addEventListener('abort', () => {
          signalAborted = true
        })
        await s.use((c) => c.query("INSERT INTO jobs (v) VALUES ('stuck')"))
        await stuck.promise
        await s.use((c) => c.query('SELECT 1'))
      },
      { name: 'stuck' },
    )
    job.catch(() => {})
    await waitFor('the job to hold a connection', () => scope.stats().holding === 1)
    await scope.close({ timeoutMs: 100 })
    expect(signalAborted).toBe(true)
    expect(scope.stats().totals.forced).toBe(1)
    expect(scope.stats().totals.destroyed).toBe(1)
    expect(t.pool.ended).toBe(true)
    expect(t.pool.totalCount).toBe(0)
    stuck.open()
    await expect(job).rejects.toThrow()
    expect(await committedRows(url, "SELECT v FROM jobs WHERE v = 'stuck'")).toEqual([])
    await waitFor('the backend to exit', async () => (await backends(url, t.app)).length === 0)
    expect(
      await independentQuery(
        url,
        "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in%'",
      ),
    ).toEqual([])
  })
})
