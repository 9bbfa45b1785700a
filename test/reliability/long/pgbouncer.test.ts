// The long run of ../pgbouncer.test.ts: the same tests, at the sizes `size(short, long)` picks
// when RELIABILITY_MODE=long (set by test/reliability/vitest.config.ts).
import '../pgbouncer.test.ts'
