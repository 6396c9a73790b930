//! Errors as Kafka Connect returns them: `{"error_code": N, "message": "..."}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rdkafka::types::RDKafkaErrorCode;
use serde_json::json;

use crate::store::StoreError;
use crate::worker::HerderError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error_code": self.status.as_u16(), "message": self.message });
        (self.status, Json(body)).into_response()
    }
}

impl From<HerderError> for ApiError {
    fn from(error: HerderError) -> Self {
        let status = match &error {
            HerderError::NotFound(_) | HerderError::TaskNotFound(..) => StatusCode::NOT_FOUND,
            HerderError::AlreadyExists(_) => StatusCode::CONFLICT,
            HerderError::BadRequest(_) | HerderError::InvalidConfig(_) => StatusCode::BAD_REQUEST,
            // What REST's own size check did not foresee (a task config grown past it): still
            // the client's record that is too large, not a server fault.
            HerderError::Store(StoreError::Kafka { source, .. })
                if source.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) =>
            {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            HerderError::Store(_) | HerderError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error.to_string())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
