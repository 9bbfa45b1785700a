// The long run of ../bad-input.test.ts: the same calls (bad input has no size), so that
// RESULTS.md has its row.
import '../bad-input.test.ts'
