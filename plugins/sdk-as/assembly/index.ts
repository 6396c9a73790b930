// medconnect guest SDK for AssemblyScript: records, the ABI plumbing (plugins/ABI.md,
// version 1) and small HL7 v2 / JSON helpers. A transform module re-exports `alloc` and
// `medconnect_abi_version` from here and defines `medconnect_transform` (and optionally
// `medconnect_configure`) by handing its functions to `transform` / `configure` below.
// Build with `--use abort=` so the module imports nothing (see plugins/README.md).

export const ABI_VERSION: i32 = 1;

const STATUS_RECORD: u8 = 0;
const STATUS_DROP: u8 = 1;
const STATUS_ERROR: u8 = 2;

export class Header {
  constructor(public name: string, public value: Uint8Array | null) {}
}

/** A Kafka record as the transform sees it. */
export class Record {
  topic: string = "";
  /** -1: the producer's partitioner decides. */
  partition: i32 = -1;
  hasTimestamp: bool = false;
  /** Milliseconds since the epoch; meaningful when `hasTimestamp`. */
  timestamp: i64 = 0;
  key: Uint8Array | null = null;
  value: Uint8Array | null = null;
  headers: Array<Header> = new Array<Header>();

  /** The last value of a header, as UTF-8 text, or null. */
  header(name: string): string | null {
    for (let i = this.headers.length - 1; i >= 0; i--) {
      const h = this.headers[i];
      if (h.name == name) {
        const v = h.value;
        return v === null ? null : String.UTF8.decode(v.buffer);
      }
    }
    return null;
  }

  /** Replaces every header of this name with one value. */
  setHeader(name: string, value: string): void {
    const kept = new Array<Header>();
    for (let i = 0; i < this.headers.length; i++) {
      if (this.headers[i].name != name) kept.push(this.headers[i]);
    }
    kept.push(new Header(name, Uint8Array.wrap(String.UTF8.encode(value))));
    this.headers = kept;
  }

  valueText(): string | null {
    const v = this.value;
    return v === null ? null : String.UTF8.decode(v.buffer);
  }

  setValueText(text: string): void {
    this.value = Uint8Array.wrap(String.UTF8.encode(text));
  }

  /** Whether the value is HL7 v2: by content type, or by its `MSH|` start. */
  isHl7(): bool {
    const ct = this.header("content-type");
    if (ct !== null) return ct.startsWith("application/hl7-v2");
    const v = this.value;
    return v !== null && v.length >= 4 && v[0] == 0x4d && v[1] == 0x53 && v[2] == 0x48 && v[3] == 0x7c;
  }
}

/** What a transform decided: a record, a drop, or an error message (no patient data in it). */
export class Outcome {
  constructor(public record: Record | null, public error: string | null) {}
  static keep(record: Record): Outcome { return new Outcome(record, null); }
  static drop(): Outcome { return new Outcome(null, null); }
  static fail(message: string): Outcome { return new Outcome(null, message); }
}

// ---- ABI plumbing ----------------------------------------------------------------------

export function medconnect_abi_version(): i32 {
  return ABI_VERSION;
}

/** The host asks for `len` bytes to write the input into; `transform`/`configure` free it. */
export function alloc(len: i32): i32 {
  return <i32>heap.alloc(<usize>max(len, 1));
}

// The last answer stays allocated until the next call: the host copies it after we return.
let answer: usize = 0;

function reply(buffer: ArrayBuffer): i64 {
  if (answer != 0) heap.free(answer);
  const len = buffer.byteLength;
  answer = heap.alloc(<usize>max(len, 1));
  memory.copy(answer, changetype<usize>(buffer), <usize>len);
  return (<i64>answer << 32) | <i64>(<u32>len);
}

class Reader {
  at: usize;
  constructor(public ptr: usize, public end: usize) { this.at = ptr; }
  u8(): u8 { const v = load<u8>(this.at); this.at += 1; return v; }
  i32(): i32 { const v = load<i32>(this.at); this.at += 4; return v; }
  i64(): i64 { const v = load<i64>(this.at); this.at += 8; return v; }
  str(): string {
    const len = <usize>this.i32();
    const s = String.UTF8.decodeUnsafe(this.at, len);
    this.at += len;
    return s;
  }
  bytes(): Uint8Array | null {
    const len = this.i32();
    if (len < 0) return null;
    const out = new Uint8Array(len);
    memory.copy(out.dataStart, this.at, <usize>len);
    this.at += <usize>len;
    return out;
  }
}

class Writer {
  parts: Array<ArrayBuffer> = new Array<ArrayBuffer>();
  size: i32 = 0;
  raw(buffer: ArrayBuffer): void { this.parts.push(buffer); this.size += buffer.byteLength; }
  u8(v: u8): void { const b = new ArrayBuffer(1); store<u8>(changetype<usize>(b), v); this.raw(b); }
  i32(v: i32): void { const b = new ArrayBuffer(4); store<i32>(changetype<usize>(b), v); this.raw(b); }
  i64(v: i64): void { const b = new ArrayBuffer(8); store<i64>(changetype<usize>(b), v); this.raw(b); }
  str(s: string): void { const b = String.UTF8.encode(s); this.i32(b.byteLength); this.raw(b); }
  bytes(v: Uint8Array | null): void {
    if (v === null) { this.i32(-1); return; }
    this.i32(v.length);
    this.raw(v.buffer.slice(v.byteOffset, v.byteOffset + v.length));
  }
  finish(): ArrayBuffer {
    const out = new ArrayBuffer(this.size);
    let at = changetype<usize>(out);
    for (let i = 0; i < this.parts.length; i++) {
      const p = this.parts[i];
      memory.copy(at, changetype<usize>(p), <usize>p.byteLength);
      at += <usize>p.byteLength;
    }
    return out;
  }
}

function decodeRecord(r: Reader): Record {
  const record = new Record();
  record.topic = r.str();
  record.partition = r.i32();
  record.hasTimestamp = (r.u8() & 1) != 0;
  record.timestamp = r.i64();
  record.key = r.bytes();
  record.value = r.bytes();
  const count = r.i32();
  for (let i = 0; i < count; i++) {
    const name = r.str();
    record.headers.push(new Header(name, r.bytes()));
  }
  return record;
}

function encodeOutcome(outcome: Outcome): ArrayBuffer {
  const w = new Writer();
  const error = outcome.error;
  const record = outcome.record;
  if (error !== null) {
    w.u8(STATUS_ERROR);
    w.str(error);
  } else if (record === null) {
    w.u8(STATUS_DROP);
  } else {
    w.u8(STATUS_RECORD);
    w.str(record.topic);
    w.i32(record.partition);
    w.u8(record.hasTimestamp ? 1 : 0);
    w.i64(record.timestamp);
    w.bytes(record.key);
    w.bytes(record.value);
    w.i32(record.headers.length);
    for (let i = 0; i < record.headers.length; i++) {
      w.str(record.headers[i].name);
      w.bytes(record.headers[i].value);
    }
  }
  return w.finish();
}

/** Runs `fn` on the record the host wrote at `ptr`; returns the packed answer. */
export function transform(ptr: i32, len: i32, fn: (record: Record) => Outcome): i64 {
  const start = <usize>ptr;
  const record = decodeRecord(new Reader(start, start + <usize>len));
  heap.free(start);
  return reply(encodeOutcome(fn(record)));
}

/** Runs `fn` on the settings the host wrote at `ptr`; `fn` returns null or an error message. */
export function configure(ptr: i32, len: i32, fn: (config: Map<string, string>) => string | null): i64 {
  const start = <usize>ptr;
  const r = new Reader(start, start + <usize>len);
  const config = new Map<string, string>();
  const count = r.i32();
  for (let i = 0; i < count; i++) {
    const key = r.str();
    config.set(key, r.str());
  }
  heap.free(start);
  const error = fn(config);
  const w = new Writer();
  if (error === null) {
    w.u8(STATUS_RECORD);
  } else {
    w.u8(STATUS_ERROR);
    w.str(error);
  }
  return reply(w.finish());
}

// ---- HL7 v2 ----------------------------------------------------------------------------

/** Field `index` of the first `segment` segment (`hl7Field(text, "MSH", 9)`), or null. */
export function hl7Field(message: string, segment: string, index: i32): string | null {
  if (!message.startsWith("MSH") || message.length < 4) return null;
  const fieldSep = message.charAt(3);
  const segments = message.includes("\r") ? message.split("\r") : message.split("\n");
  // MSH-1 is the separator itself, so MSH fields sit one to the left after splitting.
  const position = segment == "MSH" ? index - 1 : index;
  for (let i = 0; i < segments.length; i++) {
    const s = segments[i];
    if (s.startsWith(segment + fieldSep)) {
      const fields = s.split(fieldSep);
      return position < fields.length ? fields[position] : null;
    }
  }
  return null;
}

// ---- JSON ------------------------------------------------------------------------------

function skipSpace(text: string, at: i32): i32 {
  while (at < text.length) {
    const c = text.charCodeAt(at);
    if (c != 0x20 && c != 0x09 && c != 0x0a && c != 0x0d) break;
    at++;
  }
  return at;
}

/** Index just past the JSON string starting (at its quote) at `at`, or -1. */
function skipString(text: string, at: i32): i32 {
  at++;
  while (at < text.length) {
    const c = text.charCodeAt(at);
    if (c == 0x5c) { at += 2; continue; }
    if (c == 0x22) return at + 1;
    at++;
  }
  return -1;
}

/** Index just past the JSON value starting at `at`, or -1. */
function skipValue(text: string, at: i32): i32 {
  at = skipSpace(text, at);
  if (at >= text.length) return -1;
  const c = text.charCodeAt(at);
  if (c == 0x22) return skipString(text, at);
  if (c == 0x7b || c == 0x5b) {
    let depth = 0;
    while (at < text.length) {
      const d = text.charCodeAt(at);
      if (d == 0x22) { at = skipString(text, at); if (at < 0) return -1; continue; }
      if (d == 0x7b || d == 0x5b) depth++;
      if (d == 0x7d || d == 0x5d) { depth--; if (depth == 0) return at + 1; }
      at++;
    }
    return -1;
  }
  while (at < text.length) {
    const d = text.charCodeAt(at);
    if (d == 0x2c || d == 0x7d || d == 0x5d || d == 0x20 || d == 0x0a || d == 0x0d || d == 0x09) break;
    at++;
  }
  return at;
}

/**
 * The string value of a top-level member of a JSON object (`{"resourceType":"Patient"}`),
 * unescaped for the common escapes, or null when absent, not a string, or not an object.
 */
export function jsonStringField(text: string, field: string): string | null {
  let at = skipSpace(text, 0);
  if (at >= text.length || text.charCodeAt(at) != 0x7b) return null;
  at++;
  while (true) {
    at = skipSpace(text, at);
    if (at >= text.length || text.charCodeAt(at) != 0x22) return null;
    const keyEnd = skipString(text, at);
    if (keyEnd < 0) return null;
    const key = text.substring(at + 1, keyEnd - 1);
    at = skipSpace(text, keyEnd);
    if (at >= text.length || text.charCodeAt(at) != 0x3a) return null;
    at = skipSpace(text, at + 1);
    const valueEnd = skipValue(text, at);
    if (valueEnd < 0) return null;
    if (key == field) {
      if (text.charCodeAt(at) != 0x22) return null;
      return text.substring(at + 1, valueEnd - 1).replaceAll("\\\"", "\"").replaceAll("\\\\", "\\");
    }
    at = skipSpace(text, valueEnd);
    if (at >= text.length || text.charCodeAt(at) != 0x2c) return null;
    at++;
  }
}
