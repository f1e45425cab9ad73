//! OTLP client for encoded export requests.
//!
//! STUB: replaced by main's client.rs at merge. Same public API; sends nothing.
use super::export::{Signal, Target};

/// Sends encoded OTLP export requests of one signal to one endpoint.
#[derive(Debug)]
pub struct OtlpClient {
    url: String,
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// STUB: never returned.
    #[error("stub client: {0}")]
    Stub(String),
}

impl ExportError {
    /// Whether sending the same data again later may succeed.
    pub fn retryable(&self) -> bool {
        true
    }
}

impl OtlpClient {
    // STUB: replaced by main's client.rs at merge.
    pub fn new(target: &Target, _signal: Signal) -> anyhow::Result<Self> {
        Ok(Self {
            url: target.url.clone(),
        })
    }

    /// Sends one encoded export request (protobuf).
    // STUB: replaced by main's client.rs at merge.
    pub async fn export(&self, body: Vec<u8>) -> Result<(), ExportError> {
        let _ = body;
        Ok(())
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}
