/**
 * `@scoped/core/page`: a dependency-free HTML page of who holds the pool's
 * connections and how full the pool was over the last minutes. It returns
 * strings and objects; the application serves them.
 *
 * @example
 * ```ts
 * import { holdersPage } from '@scoped/core/page'
 * const page = holdersPage(scope)
 * app.get('/scoped', (c) => c.html(page.html()))
 * ```
 */
export { type HoldersPage, type HoldersPageOptions, holdersPage } from './holders-page.js'
export {
  formatDuration,
  type PageSnapshot,
  type RenderOptions,
  renderHoldersPage,
} from './render.js'
export { type PoolSample, sampleOf } from './samples.js'
