/**
 * Which Node the test workers really run on. `.ci/run` runs the suite twice, on the
 * machine's Node 20 and on a Node 24 from the registry, and sets SCOPED_EXPECT_NODE
 * to the version it meant; a worker started by some other `node` on PATH fails here
 * instead of passing a "Node 24" run on Node 20.
 */
import { readFileSync } from 'node:fs'
import { describe, expect, it } from 'vitest'

const root = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as {
  engines: { node: string }
}

describe('test runtime', () => {
  it('is a Node the packages support (package.json engines)', () => {
    const minimum = Number(/^>=\s*(\d+)/.exec(root.engines.node)?.[1])
    expect(minimum, `engines.node = ${root.engines.node}`).toBeGreaterThanOrEqual(20)
    expect(Number(process.versions.node.split('.')[0])).toBeGreaterThanOrEqual(minimum)
  })

  it('is the Node that .ci/run asked for (SCOPED_EXPECT_NODE), when it asked', () => {
    const expected = process.env.SCOPED_EXPECT_NODE ?? process.version
    expect(process.version).toBe(expected)
  })
})
