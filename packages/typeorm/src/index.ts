export {
  currentManager,
  type ScopedEntityManager,
  type ScopedRepository,
  scopedManager,
} from './scoped-manager.js'
export { typeormDriver } from './typeorm-driver.js'
