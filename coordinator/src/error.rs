//! Admin API errors: a status plus `{"error", "message"}`.
//!
//! Internal errors are reported to the client as a generic 500; their detail travels in a
//! response extension to the logging middleware, so converting an error never logs.

use std::sync::Arc;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::db::DbError;

/// An admin API failure.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 401.
    #[error("missing, invalid, revoked or expired admin token")]
    Unauthorized,
    /// 403: authenticated, but not allowed to do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409.
    #[error("{0}")]
    Conflict(String),
    /// 422: the input was understood but refused; `details` lists every reason (for a policy,
    /// one `file:line:col: message` line each).
    #[error("{message}")]
    Rejected {
        /// Summary.
        message: String,
        /// Every reason.
        details: Vec<String>,
    },
    /// 503: something the request needs (the identity provider) does not answer.
    #[error("{0}")]
    Unavailable(String),
    /// 500.
    #[error("internal error")]
    Internal(String),
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        Self::Internal(e.to_string())
    }
}

/// The detail of an internal error, for the logging middleware.
#[derive(Debug, Clone)]
pub struct InternalDetail(pub Arc<String>);

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    details: Vec<String>,
}

impl ApiError {
    /// The HTTP status and the short code the admin API answers with.
    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::Rejected { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "rejected"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status();
        let message = self.to_string();
        let details = match &self {
            Self::Rejected { details, .. } => details.clone(),
            _ => Vec::new(),
        };
        let mut resp = (
            status,
            Json(Body {
                error: code,
                message,
                details,
            }),
        )
            .into_response();
        if let Self::Internal(detail) = self {
            resp.extensions_mut()
                .insert(InternalDetail(Arc::new(detail)));
        }
        resp
    }
}
