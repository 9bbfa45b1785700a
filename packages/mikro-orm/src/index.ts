export { currentEntityManager } from './current-entity-manager.js'
export { mikroOrmDriver } from './mikro-orm-driver.js'
