/**
 * Holds a response's end back until its unit of work is decided.
 *
 * Express gives a middleware no way to await the handler, but every response
 * ends in `res.end()` (`res.json`, `res.send`, `res.redirect`, a piped stream,
 * Express's final handler). The request's unit replaces `res.end` and
 * `res.write` on the response (request-unit.ts) and hands the calls to its
 * gate: the first end is held, nothing of it reaching the socket until the
 * unit of work says `send()` (it committed) or `fail()` (the COMMIT failed).
 * A gate is made only when it has something to do: at the first `res.write()`,
 * or at an end that waits for a COMMIT. An end with nothing to commit goes
 * straight through.
 *
 * Bytes written with `res.write()` before the end go out as they come (a
 * streamed body must not wait for the database), except the one write that
 * completes a declared `Content-Length`: that chunk would let the client see
 * a complete response before the COMMIT, so it is held with the end. A
 * chunked body's end is its terminal chunk, which only `res.end()` sends.
 *
 * `res.writeHead()` is not held: code that calls it has chosen its status
 * line, so a COMMIT that fails after it cuts the connection instead of
 * answering 500.
 */
import { type ServerResponse, STATUS_CODES } from 'node:http'

type Callback = (error?: Error | null) => void
export type Args = unknown[]
export type End = (this: ServerResponse, ...args: Args) => ServerResponse
export type Write = (this: ServerResponse, ...args: Args) => boolean

/** Headers that describe the body or the state the failed response claimed; a 500 must not keep them. */
const claimHeaders = [
  'cache-control',
  'expires',
  'content-type',
  'content-length',
  'content-encoding',
  'content-language',
  'content-range',
  'content-disposition',
  'content-location',
  'etag',
  'last-modified',
  'location',
  'set-cookie',
  'transfer-encoding',
]

const failedBody = 'Internal Server Error'

/**
 * An encoded body (`compression()`: zlib's output, written after the handler
 * ended its response) is held back up to this much, so a compressed
 * `res.json()` is still decided (COMMIT, or a 500) before its first byte.
 * Past it the body is a stream and flows; its end still waits for the COMMIT.
 */
export const encodedHoldLimit = 64 * 1024

/**
 * Node's own fields: `_header` is the status line and headers once generated
 * (`headersSent` is true from then on), `_headerSent` says they went out with
 * the first bytes. `compression()` generates them before its first write.
 */
interface Outgoing {
  _header: string | null
  _headerSent?: boolean
}

/** Bytes of this response are on the wire (or it is destroyed): its status can no longer change. */
function onWire(res: ServerResponse): boolean {
  return res.destroyed || (res as unknown as Outgoing)._headerSent === true
}

function isEncoded(res: ServerResponse): boolean {
  const encoding = res.getHeader('content-encoding')
  return encoding !== undefined && encoding !== '' && encoding !== 'identity'
}

function byteLength(chunk: unknown, encoding: unknown): number {
  if (typeof chunk === 'string') {
    return Buffer.byteLength(
      chunk,
      typeof encoding === 'string' ? (encoding as BufferEncoding) : 'utf8',
    )
  }
  if (chunk instanceof Uint8Array) return chunk.byteLength
  return 0
}

export function callbackIn(args: Args): Callback | undefined {
  for (let i = args.length - 1; i >= 0; i--) {
    if (typeof args[i] === 'function') return args[i] as Callback
  }
  return undefined
}

export class ResponseGate {
  #end: End
  #write: Write
  /** open: passing writes; holding: end() called, waiting for the verdict; released: pass-through. */
  #state: 'open' | 'holding' | 'released' = 'open'
  #endArgs: Args = []
  /** Writes held back: the one completing Content-Length and any after it, or an encoded body's. */
  #held: Args[] = []
  #written = 0
  /** Holding an encoded body's writes (see encodedHoldLimit): how many bytes. */
  #encodedBytes = -1
  /** The status and headers as they were when the held end was called (see freeze). */
  #frozen: { status: number; message: string; headers: Record<string, unknown> } | undefined

  /** `end` and `write`: what the response had before (Node's, or an earlier middleware's). */
  constructor(end: End, write: Write) {
    this.#end = end
    this.#write = write
  }

  /** Hold this first end until `send()` or `fail()`. */
  hold(args: Args): void {
    this.#state = 'holding'
    this.#endArgs = args
  }

  /**
   * The held end waits for a COMMIT: keep its status and headers as they are now.
   * While it waits, `res.headersSent` is still false, so Express's final handler
   * (a throw or a `next()` after `res.json()`) or a timeout callback's
   * `if (!res.headersSent) res.status(503)` may rewrite them for an answer of
   * their own (whose end is ignored, as Node ignores an end after end). The
   * response that goes out is the one that was ended, as it was ended.
   */
  freeze(res: ServerResponse): void {
    if (this.#frozen !== undefined || res.headersSent) return
    this.#frozen = {
      status: res.statusCode,
      message: res.statusMessage,
      headers: { ...res.getHeaders() },
    }
    const writeHead = res.writeHead
    const setHeader = res.setHeader
    const removeHeader = res.removeHeader
    const ignored = (r: ServerResponse) => this.#state === 'holding' || r.headersSent
    res.writeHead = function writeHeadHeld(this: ServerResponse, ...args: Args) {
      if (ignored(this)) return this
      return writeHead.apply(this, args as Parameters<ServerResponse['writeHead']>)
    } as ServerResponse['writeHead']
    res.setHeader = function setHeaderHeld(this: ServerResponse, ...args: Args) {
      if (ignored(this)) return this
      return setHeader.apply(this, args as Parameters<ServerResponse['setHeader']>)
    } as ServerResponse['setHeader']
    res.removeHeader = function removeHeaderHeld(this: ServerResponse, name: string) {
      if (!ignored(this)) removeHeader.call(this, name)
    }
  }

  #thaw(res: ServerResponse): void {
    const frozen = this.#frozen
    if (frozen === undefined || res.headersSent) return
    res.statusCode = frozen.status
    res.statusMessage = frozen.message
    for (const name of res.getHeaderNames()) {
      if (!(name in frozen.headers)) res.removeHeader(name)
    }
    for (const name in frozen.headers) {
      if (res.getHeader(name) !== frozen.headers[name]) {
        res.setHeader(name, frozen.headers[name] as string | number | readonly string[])
      }
    }
  }

  /** Let everything held through: the response ends as the handler wrote it. */
  send(res: ServerResponse): void {
    if (this.#state === 'released') return
    this.#state = 'released'
    this.#thaw(res)
    for (const args of this.#held) this.#write.apply(res, args)
    this.#held = []
    this.#end.apply(res, this.#endArgs)
  }

  /**
   * The unit of work failed to commit what the response claims. Nothing sent
   * yet: answer 500 instead. Headers or body already on the wire: destroy the
   * socket, so the client sees the response break off, never a clean end.
   */
  fail(res: ServerResponse): void {
    if (this.#state === 'released') return
    this.#state = 'released'
    const callback = callbackIn(this.#endArgs)
    const dropped = new Error('the response was abandoned: its unit of work failed to commit')
    for (const args of this.#held) {
      const cb = callbackIn(args)
      if (cb) process.nextTick(cb, dropped)
    }
    this.#held = []
    if (onWire(res)) {
      res.destroy()
      return
    }
    this.#thaw(res)
    // Generated but not sent (compression() does so before its body): start over.
    if (res.headersSent) (res as unknown as Outgoing)._header = null
    for (const name of claimHeaders) res.removeHeader(name)
    res.statusCode = 500
    res.statusMessage = STATUS_CODES[500] ?? failedBody
    res.setHeader('Content-Type', 'text/plain; charset=utf-8')
    res.setHeader('Content-Length', Buffer.byteLength(failedBody))
    res.setHeader('Cache-Control', 'no-store')
    res.setHeader('X-Content-Type-Options', 'nosniff')
    this.#end.call(res, failedBody, 'utf8', callback)
  }

  /** A later `res.end()`: held behind the first one, or through once released. */
  endAgain(res: ServerResponse, args: Args): ServerResponse {
    if (this.#state !== 'holding') return this.#end.apply(res, args)
    // A second end() while the first waits for the COMMIT: Node ignores an end
    // after end; its callback runs when the response finishes.
    const cb = callbackIn(args)
    if (cb) res.once('finish', () => cb())
    return res
  }

  write(res: ServerResponse, args: Args): boolean {
    if (this.#state === 'released') return this.#write.apply(res, args)
    if (this.#state === 'holding') {
      // Write after end: refuse it as Node does, without reordering the held end.
      const cb = callbackIn(args)
      const err = Object.assign(new Error('write after end'), {
        code: 'ERR_STREAM_WRITE_AFTER_END',
      })
      if (cb) process.nextTick(cb, err)
      return false
    }
    const len = byteLength(args[0], args[1])
    if (this.#held.length > 0) {
      this.#held.push(args)
      if (this.#encodedBytes >= 0) {
        this.#encodedBytes += len
        if (this.#encodedBytes > encodedHoldLimit) return this.#flow(res)
      }
      return true
    }
    const declared = Number(res.getHeader('content-length'))
    if (len > 0 && Number.isFinite(declared) && this.#written + len >= declared) {
      this.#held.push(args)
      return true
    }
    if (
      len > 0 &&
      // Nothing written yet (an encoded body that outgrew the limit has: it flows).
      this.#written === 0 &&
      !onWire(res) &&
      !Number.isFinite(declared) &&
      isEncoded(res)
    ) {
      this.#encodedBytes = len
      this.#held.push(args)
      return true
    }
    this.#written += len
    return this.#write.apply(res, args)
  }

  /** The held encoded body outgrew the limit: write it out, and let the rest flow. */
  #flow(res: ServerResponse): boolean {
    this.#encodedBytes = -1
    const held = this.#held
    this.#held = []
    let ok = true
    for (const args of held) {
      this.#written += byteLength(args[0], args[1])
      ok = this.#write.apply(res, args)
    }
    return ok
  }
}
