// The long run of ../pool-exhaustion.test.ts: the same tests, at the sizes `size(short, long)` picks
// when RELIABILITY_MODE=long (set by test/reliability/vitest.config.ts).
import '../pool-exhaustion.test.ts'
