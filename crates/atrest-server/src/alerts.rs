//! Webhooks: every state change of a server, whatever its engine, is
//! POSTed as JSON to each configured URL, retried with exponential backoff.

use std::time::Duration;

use serde_json::json;

use crate::config::ServerConfig;
use crate::resource::{self, State};

/// Webhooks: an HTTP POST with a JSON body on every state change, retried
/// with exponential backoff.
pub struct Alerts {
    urls: Vec<String>,
    client: reqwest::Client,
    pending: std::sync::Mutex<tokio::task::JoinSet<()>>,
}

impl Alerts {
    pub fn new(urls: &[String]) -> Alerts {
        Alerts {
            urls: urls.to_vec(),
            client: webhook_client(),
            pending: std::sync::Mutex::default(),
        }
    }

    pub fn notify(&self, config: &ServerConfig, state: State, reason: &str) {
        if self.urls.is_empty() {
            return;
        }
        let body = json!({
            "server": config.name,
            "server_id": config.server_id,
            "state": state,
            "reason": reason,
            "time": resource::now_rfc3339(),
            "customer_key": config.encryption.customer_key.as_ref().map(|c| c.key.kid()),
        });
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let mut pending = self.pending.lock().expect("alerts");
        for url in &self.urls {
            let (client, url, body) = (self.client.clone(), url.clone(), body.clone());
            pending.spawn(async move {
                let mut delay = Duration::from_millis(250);
                for attempt in 1..=6 {
                    match client.post(&url).json(&body).send().await {
                        Ok(r) if r.status().is_success() => return,
                        Ok(r) => tracing::warn!(%url, status = %r.status(), attempt, "webhook refused the alert"),
                        Err(e) => tracing::warn!(%url, error = %e, attempt, "webhook unreachable"),
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
                tracing::error!(%url, "alert not delivered after 6 attempts");
            });
        }
    }

    /// Waits (bounded) for alerts still being delivered.
    pub async fn drain(&self, limit: Duration) {
        let mut set = std::mem::take(&mut *self.pending.lock().expect("alerts"));
        let _ =
            tokio::time::timeout(limit, async { while set.join_next().await.is_some() {} }).await;
    }
}

/// An HTTP client for webhooks: rustls on aws-lc-rs, trusting the system
/// CA bundle for https URLs.
fn webhook_client() -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    if let Ok(pem) = std::fs::read("/etc/ssl/certs/ca-certificates.crt") {
        for c in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
            let _ = roots.add(c);
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(atrest_vault::tls::provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if let Ok(cfg) = tls {
        b = b.use_preconfigured_tls(cfg);
    }
    b.build().expect("webhook HTTP client")
}
