export { type ExampleDatabase, openDatabase } from './database.ts'
export {
  InvalidOrderError,
  type OrderInput,
  type OrderItemInput,
  parseOrderInput,
} from './input.ts'
export {
  createOrders,
  type Order,
  type OrderItem,
  type Orders,
  type OrdersSummary,
  type OrderWithItems,
} from './orders.ts'
export { createSchema, type DB, type OrderStatus } from './schema.ts'
export { sampleOrder } from './seed.ts'
