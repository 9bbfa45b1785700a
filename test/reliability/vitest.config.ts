/**
 * The long reliability run: `pnpm test:reliability`. Runs the scenarios of
 * test/reliability/long/ (the same files as the short ones, at full size),
 * one file at a time so they do not disturb each other's measurements, and
 * writes test/reliability/RESULTS.md at the end.
 */
import { fileURLToPath } from 'node:url'
import { defineConfig } from 'vitest/config'
import { alias } from '../../vitest.config.ts'

export default defineConfig({
  root: fileURLToPath(new URL('../..', import.meta.url)),
  resolve: { alias },
  test: {
    include: ['test/reliability/long/**/*.test.ts'],
    globalSetup: ['./test/support/global-setup.ts', './test/reliability/support/long-run.ts'],
    env: { RELIABILITY_MODE: 'long' },
    fileParallelism: false,
    testTimeout: 1_800_000,
    hookTimeout: 120_000,
    pool: 'forks',
    reporters: ['default'],
  },
})
