//! Fuzz target `rest_body` (tests/fuzz/engine.rs): request bodies as the REST API reads them
//! (`JsonBody`: the Content-Type check, the size limit) and then parses them (`parse_body`,
//! `string_map` for a connector config). Any client can send these, so: no panic, every
//! refusal a 4xx in Connect's shape, a body taken as it came.

// Both runtime targets include the engine; a copy each keeps them independent test modules.
#[allow(clippy::duplicate_mod)]
#[path = "../../../tests/fuzz/engine.rs"]
mod engine;

use axum::body::Body;
use axum::extract::FromRequest;
use axum::http::{Request, StatusCode, header};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

use super::{JsonBody, MAX_BODY_BYTES, is_json};
use crate::rest::{parse_body, string_map};

/// The first line is the Content-Type (absent when it is not a valid header value), the rest
/// the body.
fn rest_body(input: &[u8], runtime: &tokio::runtime::Runtime) -> Result<(), TestCaseError> {
    let split = input
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or(input.len());
    let (content_type, body) = (&input[..split], input.get(split + 1..).unwrap_or(&[]));
    let mut request = Request::builder().method("POST").uri("/connectors");
    let declared = axum::http::HeaderValue::from_bytes(content_type).ok();
    if let Some(value) = &declared {
        request = request.header(header::CONTENT_TYPE, value.clone());
    }
    let request = request
        .body(Body::from(body.to_vec()))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let read = runtime.block_on(JsonBody::from_request(request, &()));
    let json_declared = declared
        .as_ref()
        .is_none_or(|v| is_json(v.to_str().unwrap_or_default()));
    match read {
        Ok(JsonBody(bytes)) => {
            prop_assert!(json_declared, "a non-JSON Content-Type was taken");
            prop_assert_eq!(&bytes[..], body, "the body as sent");
            match parse_body::<Value>(&bytes) {
                Ok(value) => {
                    let config = value.get("config").unwrap_or(&value);
                    if let Err(error) = string_map(config, "config") {
                        prop_assert_eq!(error.status, StatusCode::BAD_REQUEST);
                        prop_assert!(error.message.len() < 1024 + body.len());
                    }
                }
                Err(error) => {
                    prop_assert_eq!(error.status, StatusCode::BAD_REQUEST);
                    prop_assert!(error.message.len() < 1024, "{}", error.message);
                }
            }
        }
        Err(error) => {
            prop_assert!(error.status.is_client_error(), "{}", error.status);
            prop_assert!(
                !json_declared || body.len() > MAX_BODY_BYTES,
                "a JSON body refused: {} {}",
                error.status,
                error.message
            );
        }
    }
    Ok(())
}

#[test]
fn fuzz_rest_body() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let target = engine::Target::new("rest_body", env!("CARGO_MANIFEST_DIR"))
        .seed("application/json\n{\"name\":\"a\",\"config\":{\"connector.class\":\"FileSink\",\"topics\":\"t\"}}")
        .seed("\n{\"level\":\"DEBUG\"}")
        .seed("text/plain\nhello")
        .tokens([
            "application/json", "application/vnd.kafka+json", "; charset=utf-8", "\n", "{", "}",
            "[", "]", "\"", "\\u0000", "\\ud800", ":", ",", "null", "true", "1e999", "-0",
            "\"config\":", "\"name\":", "\u{feff}",
        ])
        .max_len(16 * 1024);
    engine::run(target, |input| rest_body(input, &runtime));
}
