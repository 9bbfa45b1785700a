export { type ScopedDrizzle, scopedDrizzle } from './scoped-drizzle.js'
