/**
 * What a client may send to create an order, checked before anything touches
 * the database.
 */

export interface OrderItemInput {
  sku: string
  quantity: number
  priceCents: number
}

export interface OrderInput {
  customer: string
  items: OrderItemInput[]
}

/** A request body that is not a valid order: the apps answer 400 with its message. */
export class InvalidOrderError extends Error {
  readonly status = 400
  constructor(message: string) {
    super(message)
    this.name = 'InvalidOrderError'
  }
}

function positiveInteger(v: unknown, min: number): v is number {
  return typeof v === 'number' && Number.isInteger(v) && v >= min && v <= 1_000_000_000
}

/**
 * Check a parsed JSON body: `{ customer: string, items: [{ sku, quantity, priceCents }] }`
 * with 1 to 100 items.
 *
 * @example
 * ```ts
 * const input = parseOrderInput(await c.req.json())   // throws InvalidOrderError
 * ```
 */
export function parseOrderInput(body: unknown): OrderInput {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) {
    throw new InvalidOrderError(
      'expected a JSON object: { customer, items: [{ sku, quantity, priceCents }] }',
    )
  }
  const { customer, items } = body as Record<string, unknown>
  if (typeof customer !== 'string' || customer.trim() === '' || customer.length > 200) {
    throw new InvalidOrderError('customer: expected a non-empty string of at most 200 characters')
  }
  if (!Array.isArray(items) || items.length === 0 || items.length > 100) {
    throw new InvalidOrderError('items: expected an array of 1 to 100 items')
  }
  return {
    customer,
    items: items.map((item: unknown, i) => {
      const { sku, quantity, priceCents } = (item ?? {}) as Record<string, unknown>
      if (typeof sku !== 'string' || sku === '' || sku.length > 64) {
        throw new InvalidOrderError(
          `items[${i}].sku: expected a non-empty string of at most 64 characters`,
        )
      }
      if (!positiveInteger(quantity, 1)) {
        throw new InvalidOrderError(`items[${i}].quantity: expected an integer >= 1`)
      }
      if (!positiveInteger(priceCents, 0)) {
        throw new InvalidOrderError(`items[${i}].priceCents: expected an integer >= 0`)
      }
      return { sku, quantity, priceCents }
    }),
  }
}
