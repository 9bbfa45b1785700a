import { integer, pgTable, serial, text } from 'drizzle-orm/pg-core'

/** The ORM suite's `notes` table; `pid` and `txid` are filled by column defaults. */
export const notes = pgTable('notes', {
  id: serial('id').primaryKey(),
  v: text('v').notNull(),
  pid: integer('pid'),
})
