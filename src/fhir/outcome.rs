//! FHIR errors: every failure is an OperationOutcome with the status FHIR's RESTful API gives it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum FhirError {
    /// 400: a malformed parameter value (or an unknown parameter under `handling=strict`).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// 410: the resource existed and was deleted.
    #[error("{0}")]
    Gone(String),
    /// 406: a format other than JSON.
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<sqlx::Error> for FhirError {
    fn from(e: sqlx::Error) -> Self {
        FhirError::Internal(format!("index: {e}"))
    }
}

impl FhirError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            FhirError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            FhirError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            FhirError::Gone(_) => (StatusCode::GONE, "deleted"),
            FhirError::NotAcceptable(_) => (StatusCode::NOT_ACCEPTABLE, "not-supported"),
            FhirError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "exception"),
        }
    }
}

/// An OperationOutcome with one issue.
pub fn operation_outcome(severity: &str, code: &str, diagnostics: &str) -> serde_json::Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    })
}

impl IntoResponse for FhirError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self, "FHIR request failed");
        }
        let body = operation_outcome("error", code, &self.to_string());
        (
            status,
            [("content-type", super::CONTENT_TYPE)],
            body.to_string(),
        )
            .into_response()
    }
}
