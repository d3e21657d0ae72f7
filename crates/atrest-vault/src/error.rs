//! Errors: `ApiError` is what a client sees (Azure's envelope); `VaultError`
//! is what library functions return before a handler maps it.

use serde_json::json;

/// An error answered to a client, in Azure Key Vault's envelope
/// `{"error":{"code","message","innererror":{"code"}}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub inner: Option<String>,
    /// Extra response headers (the 401 challenge).
    pub headers: Vec<(String, String)>,
}

impl ApiError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
            inner: None,
            headers: Vec::new(),
        }
    }
    pub fn inner(mut self, inner: &str) -> Self {
        self.inner = Some(inner.to_string());
        self
    }
    pub fn bad_parameter(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadParameter", message)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }
    pub fn key_not_found(name: &str) -> Self {
        ApiError::new(
            404,
            "KeyNotFound",
            format!("A key with (name/id) {name} was not found in this key vault."),
        )
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(404, "NotFound", message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError::new(409, "Conflict", message)
    }
    pub fn forbidden(message: impl Into<String>, inner: &str) -> Self {
        ApiError::new(403, "Forbidden", message).inner(inner)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(500, "InternalServerError", message)
    }
    pub fn body(&self) -> serde_json::Value {
        let mut err = json!({"code": self.code, "message": self.message});
        if let Some(inner) = &self.inner {
            err["innererror"] = json!({"code": inner});
        }
        json!({ "error": err })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

/// Library-level failures (storage, unseal, audit, TLS setup).
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("storage: {0}")]
    Storage(#[from] rusqlite::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("unseal failed: {0}")]
    Unseal(String),
    #[error("crypto operation failed: {0}")]
    Crypto(&'static str),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("audit log unavailable: {0}")]
    Audit(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<VaultError> for ApiError {
    fn from(e: VaultError) -> Self {
        match e {
            VaultError::Invalid(m) => ApiError::bad_parameter(m),
            VaultError::Audit(m) => ApiError::new(
                503,
                "AuditLogUnavailable",
                format!(
                    "the operation was refused because its audit record could not be written: {m}"
                ),
            ),
            // Storage and crypto internals are logged, not echoed: they can
            // carry paths and states an unauthenticated caller should not see.
            other => {
                tracing::error!(error = %other, "internal error");
                ApiError::internal("internal error; see the vault's log")
            }
        }
    }
}
