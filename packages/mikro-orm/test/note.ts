import { EntitySchema } from '@mikro-orm/core'

/** A row of the ORM suite's `notes` table; `pid` and `txid` are filled by column defaults. */
export interface Note {
  id: number
  v: string
}

/** Defined without decorators, so the tests need no decorator transform. */
export const NoteSchema = new EntitySchema<Note>({
  name: 'Note',
  tableName: 'notes',
  properties: {
    id: { type: 'number', primary: true, autoincrement: true },
    v: { type: 'string' },
  },
})
