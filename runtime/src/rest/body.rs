//! Request bodies as Kafka Connect takes them: JSON only (415 otherwise), bounded in size (413),
//! every refusal in Connect's JSON error shape rather than axum's plain-text rejections.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};

use super::ApiError;

/// The largest request body read, in bytes. A connector config is bounded further by what one
/// record of the config topic can hold (`RestState::max_config_bytes`); this bound only keeps
/// an endless upload from being buffered.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// A request body that claims to be JSON (or claims nothing), at most [`MAX_BODY_BYTES`].
pub struct JsonBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Connect's resources `@Consumes(application/json)`: another declared type is a 415.
        // A body without a Content-Type is read as JSON, as curl users expect.
        if let Some(value) = request.headers().get(header::CONTENT_TYPE)
            && !is_json(value.to_str().unwrap_or_default())
        {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "HTTP 415 Unsupported Media Type: the request body must be application/json",
            ));
        }
        let body =
            Bytes::from_request(request, state)
                .await
                .map_err(|rejection| match rejection.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("Request body is larger than the limit of {MAX_BODY_BYTES} bytes"),
                    ),
                    status => ApiError::new(status, rejection.body_text()),
                })?;
        Ok(Self(body))
    }
}

/// `application/json` or a `+json` type, with any parameters (`; charset=utf-8`).
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|subtype| subtype.ends_with("+json"))
}

#[cfg(test)]
#[path = "body_fuzz.rs"]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::is_json;

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=UTF-8"));
        assert!(is_json("application/vnd.kafka+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json("application/x-www-form-urlencoded"));
        assert!(!is_json(""));
    }
}
