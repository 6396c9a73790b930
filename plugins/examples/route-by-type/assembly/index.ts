// route-by-type in AssemblyScript: the same behaviour and settings as the Rust example
// (../src/lib.rs). HL7 v2 values are routed by MSH-9 (`ADT^A01` -> `ADT_A01`), JSON values by
// a top-level string field (`json.field`, default `resourceType`). `topic.format` (default
// `${topic}.${type}`) names the new topic. A record without a type keeps its topic.

import { Record, Outcome, transform, configure, hl7Field, jsonStringField } from "../../../sdk-as/assembly/index";
export { alloc, medconnect_abi_version } from "../../../sdk-as/assembly/index";

let format: string = "${topic}.${type}";
let jsonField: string = "resourceType";

/** Kafka topic names allow [a-zA-Z0-9._-]; everything else becomes `_`. */
function topicSafe(text: string): string {
  let out = "";
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    const ok = (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || c == 0x2e || c == 0x2d;
    out += ok ? String.fromCharCode(c) : "_";
  }
  return out;
}

function setUp(config: Map<string, string>): string | null {
  if (config.has("topic.format")) format = config.get("topic.format");
  if (!format.includes("${type}")) return "topic.format must contain ${type}";
  if (config.has("json.field")) jsonField = config.get("json.field");
  return null;
}

function route(record: Record): Outcome {
  const text = record.valueText();
  if (text === null) return Outcome.keep(record);
  let kind: string | null = null;
  if (record.isHl7()) {
    if (!text.startsWith("MSH")) return Outcome.fail("not an HL7 v2 message: it does not start with an MSH segment");
    kind = hl7Field(text, "MSH", 9);
  } else {
    kind = jsonStringField(text, jsonField);
  }
  if (kind !== null && kind.length > 0) {
    record.topic = format.replaceAll("${topic}", record.topic).replaceAll("${type}", topicSafe(kind));
    // The partition was chosen for the old topic; the new one may have fewer.
    record.partition = -1;
  }
  return Outcome.keep(record);
}

export function medconnect_configure(ptr: i32, len: i32): i64 {
  return configure(ptr, len, setUp);
}

export function medconnect_transform(ptr: i32, len: i32): i64 {
  return transform(ptr, len, route);
}
