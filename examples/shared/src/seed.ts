/**
 * A few sample orders, so a worker started on an empty embedded database has
 * something to do.
 */
import type { OrderInput } from './input.ts'

const customers = ['ada', 'grace', 'edsger', 'barbara', 'ken', 'margaret']
const skus = ['BOOK-1', 'BOOK-2', 'MUG-1', 'PEN-3', 'LAMP-2']

/** The `i`-th sample order (deterministic). */
export function sampleOrder(i: number): OrderInput {
  const n = 1 + (i % 3)
  return {
    customer: customers[i % customers.length] as string,
    items: Array.from({ length: n }, (_, k) => ({
      sku: skus[(i + k) % skus.length] as string,
      quantity: 1 + ((i + k) % 4),
      priceCents: 250 * (1 + ((i * 7 + k) % 9)),
    })),
  }
}
