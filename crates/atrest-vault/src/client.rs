//! Rust clients for the vault over HTTPS with certificate verification.
//!
//! `VaultClient` is what a database server uses: it authenticates with
//! client credentials at the token endpoint (caching the token until shortly
//! before it expires) and calls get / wrapKey / unwrapKey. Its errors tell
//! an outage (`is_outage`: vault unreachable, 5xx, throttled) apart from a
//! refusal (`is_refusal`: the vault answered no — revoked permission,
//! deleted, disabled or expired key, firewall), which the server needs to
//! report Inaccessible correctly.
//!
//! `AdminClient` drives the admin API (identities, policies, firewall,
//! vault properties, locks); the CLI is built on it.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::b64;

/// Default api-version sent by the clients.
pub const API_VERSION: &str = "7.4";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("vault unreachable: {0}")]
    Transport(String),
    #[error("vault answered {status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        inner: Option<String>,
        message: String,
    },
    #[error("unexpected response from the vault: {0}")]
    Protocol(String),
    #[error("tls setup: {0}")]
    Tls(String),
    #[error("client credential: {0}")]
    Credential(String),
}

impl ClientError {
    /// The vault could not be asked (network, TLS, 5xx, throttling).
    pub fn is_outage(&self) -> bool {
        match self {
            ClientError::Transport(_) => true,
            ClientError::Api { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
    /// The vault answered and said no (401/403/404/409...).
    pub fn is_refusal(&self) -> bool {
        matches!(self, ClientError::Api { status, .. } if (400..500).contains(status) && *status != 429)
    }
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
    pub fn inner_code(&self) -> Option<&str> {
        match self {
            ClientError::Api { inner, .. } => inner.as_deref(),
            _ => None,
        }
    }
}

/// A raw answer: status, headers and JSON body (Null when empty).
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl RawResponse {
    pub fn error_code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }
    pub fn inner_code(&self) -> Option<&str> {
        self.body["error"]["innererror"]["code"].as_str()
    }
    pub fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
    fn into_result(self) -> Result<Value, ClientError> {
        if self.status < 400 {
            return Ok(self.body);
        }
        Err(ClientError::Api {
            status: self.status,
            code: self
                .error_code()
                .or_else(|| self.body["error"].as_str())
                .unwrap_or("")
                .to_string(),
            inner: self.inner_code().map(str::to_string),
            message: self.body["error"]["message"]
                .as_str()
                .or_else(|| self.body["error_description"].as_str())
                .unwrap_or("")
                .to_string(),
        })
    }
}

/// An HTTPS client trusting only `ca_pem`, optionally bound to a local
/// address (tests use 127.0.0.x to exercise the firewall).
pub fn http_client(ca_pem: &[u8], local: Option<IpAddr>) -> Result<reqwest::Client, ClientError> {
    let cfg = crate::tls::client_config(ca_pem).map_err(|e| ClientError::Tls(e.to_string()))?;
    reqwest::Client::builder()
        .use_preconfigured_tls(cfg)
        .local_address(local)
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .build()
        .map_err(|e| ClientError::Tls(e.to_string()))
}

/// Sends one request; `token` goes into `Authorization: Bearer`.
pub async fn send(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<RawResponse, ClientError> {
    let mut rb = http.request(method, url);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    if let Some(b) = body {
        rb = rb.header("content-type", "application/json").body(b);
    }
    let resp = rb
        .send()
        .await
        .map_err(|e| ClientError::Transport(format!("{e}")))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| ClientError::Transport(format!("{e}")))?;
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|_| ClientError::Protocol(format!("non-JSON body with status {status}")))?
    };
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

/// The vault's token endpoint for `tenant`, exactly as its OpenID
/// discovery document advertises it (`token_endpoint`) when reached at
/// `base`: also the `aud` a client assertion must carry.
pub fn token_endpoint(base: &str, tenant: &str) -> String {
    format!("{}/{tenant}/oauth2/v2.0/token", base.trim_end_matches('/'))
}

/// How a `VaultClient` proves its identity at the token endpoint.
enum Credential {
    /// A client secret (`client_secret_post`).
    Secret(Zeroizing<String>),
    /// A certificate's private key: a fresh signed client assertion
    /// (`private_key_jwt`) for every token request.
    Certificate(crate::certauth::AssertionSigner),
}

/// A data-plane client for one identity.
pub struct VaultClient {
    http: reqwest::Client,
    base: String,
    tenant: String,
    client_id: String,
    credential: Credential,
    /// Added to the system clock when signing client assertions.
    clock_offset: i64,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for VaultClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultClient")
            .field("base", &self.base)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl VaultClient {
    /// `base` is the vault URL (`https://host:port`), `ca_pem` the CA that
    /// signed its certificate.
    pub fn new(
        base: &str,
        ca_pem: &[u8],
        tenant: &str,
        client_id: &str,
        client_secret: &str,
    ) -> Result<Self, ClientError> {
        Self::with_http(
            http_client(ca_pem, None)?,
            base,
            tenant,
            client_id,
            client_secret,
        )
    }

    pub fn with_http(
        http: reqwest::Client,
        base: &str,
        tenant: &str,
        client_id: &str,
        client_secret: &str,
    ) -> Result<Self, ClientError> {
        Ok(VaultClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            tenant: tenant.to_string(),
            client_id: client_id.to_string(),
            credential: Credential::Secret(Zeroizing::new(client_secret.to_string())),
            clock_offset: 0,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// A client for an identity registered with a certificate: it signs a
    /// fresh ES256 client assertion (5-minute lifetime, random `jti`) with
    /// `key_pkcs8_pem` (an EC P-256 PKCS#8 PEM, `-----BEGIN PRIVATE KEY-----`)
    /// for each token request. No secret is sent.
    pub fn with_certificate(
        http: reqwest::Client,
        base: &str,
        tenant: &str,
        client_id: &str,
        key_pkcs8_pem: &[u8],
    ) -> Result<Self, ClientError> {
        let signer = crate::certauth::AssertionSigner::from_pkcs8_pem(key_pkcs8_pem)
            .map_err(|e| ClientError::Credential(e.to_string()))?;
        Ok(VaultClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            tenant: tenant.to_string(),
            client_id: client_id.to_string(),
            credential: Credential::Certificate(signer),
            clock_offset: 0,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// Signs client assertions as if the clock were `offset_secs` ahead of
    /// the system clock. Only for a vault run with `--test-clock` whose
    /// clock was moved (`POST /admin/clock` answers its `offset`): the vault
    /// checks assertion times against its own clock.
    pub fn with_clock_offset(mut self, offset_secs: i64) -> Self {
        self.clock_offset = offset_secs;
        self
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// A cached access token, refreshed a minute before it expires.
    pub async fn token(&self) -> Result<String, ClientError> {
        let mut guard = self.token.lock().await;
        if let Some((t, until)) = guard.as_ref() {
            if Instant::now() < *until {
                return Ok(t.clone());
            }
        }
        let url = token_endpoint(&self.base, &self.tenant);
        let form = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials")
                .append_pair("client_id", &self.client_id)
                .append_pair("scope", "https://vault.azure.net/.default");
            match &self.credential {
                Credential::Secret(s) => {
                    form.append_pair("client_secret", s);
                }
                Credential::Certificate(signer) => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs() as i64)
                        .unwrap_or(0)
                        + self.clock_offset;
                    let a = signer.assertion(
                        &self.client_id,
                        &url,
                        now,
                        crate::certauth::CLIENT_ASSERTION_LIFETIME_SECS,
                    );
                    form.append_pair("client_assertion_type", crate::certauth::ASSERTION_TYPE)
                        .append_pair("client_assertion", &a);
                }
            }
            Zeroizing::new(form.finish())
        };
        let resp = self
            .http
            .post(url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.as_str().to_owned())
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let raw = RawResponse {
            status,
            headers: Default::default(),
            body,
        };
        let body = raw.into_result()?;
        let tok = body["access_token"]
            .as_str()
            .ok_or_else(|| ClientError::Protocol("token response without access_token".into()))?
            .to_string();
        let life = body["expires_in"].as_u64().unwrap_or(300);
        let until = Instant::now() + Duration::from_secs(life.saturating_sub(60).max(1));
        *guard = Some((tok.clone(), until));
        Ok(tok)
    }

    /// Forgets the cached token (after a 401, for instance).
    pub async fn reset_token(&self) {
        *self.token.lock().await = None;
    }

    /// Calls `path` (e.g. `/keys/k1/create`) with a fresh or cached token.
    /// A 401 (token expired early, vault restarted with a new signing key)
    /// is retried once with a new token; a second 401 is returned.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{sep}api-version={API_VERSION}", self.base);
        let body = body.map(|b| serde_json::to_vec(&b).expect("serialize"));
        let tok = self.token().await?;
        let first = send(&self.http, method.clone(), &url, Some(&tok), body.clone()).await?;
        if first.status != 401 {
            return first.into_result();
        }
        self.reset_token().await;
        let tok = self.token().await?;
        send(&self.http, method, &url, Some(&tok), body)
            .await?
            .into_result()
    }

    /// The key bundle (public JWK and attributes); `version` None = current.
    pub async fn get_key(&self, name: &str, version: Option<&str>) -> Result<Value, ClientError> {
        self.call(
            Method::GET,
            &format!("/keys/{name}/{}", version.unwrap_or("")),
            None,
        )
        .await
    }

    /// Wraps `plaintext` server-side; returns the key id used and the result.
    pub async fn wrap_key(
        &self,
        name: &str,
        version: Option<&str>,
        alg: &str,
        plaintext: &[u8],
    ) -> Result<(String, Vec<u8>), ClientError> {
        let v = self
            .call(
                Method::POST,
                &format!("/keys/{name}/{}/wrapkey", version.unwrap_or("")),
                Some(json!({"alg": alg, "value": b64::encode(plaintext)})),
            )
            .await?;
        let kid = v["kid"].as_str().unwrap_or_default().to_string();
        let out = v["value"]
            .as_str()
            .and_then(b64::decode)
            .ok_or_else(|| ClientError::Protocol("wrapKey answer without value".into()))?;
        Ok((kid, out))
    }

    /// Unwraps with a specific key version (the one recorded at wrap time).
    pub async fn unwrap_key(
        &self,
        name: &str,
        version: &str,
        alg: &str,
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, ClientError> {
        let v = self
            .call(
                Method::POST,
                &format!("/keys/{name}/{version}/unwrapkey"),
                Some(json!({"alg": alg, "value": b64::encode(wrapped)})),
            )
            .await?;
        let s = Zeroizing::new(
            v["value"]
                .as_str()
                .ok_or_else(|| ClientError::Protocol("unwrapKey answer without value".into()))?
                .to_string(),
        );
        b64::decode(&s)
            .map(Zeroizing::new)
            .ok_or_else(|| ClientError::Protocol("unwrapKey value is not base64url".into()))
    }

    /// Registers that this identity's server `dependent_id` (a GUID)
    /// depends on key version `name/version`: while registered, the vault
    /// refuses to disable the version or purge the key (409 `KeyInUse`)
    /// unless forced. Idempotent. Needs the `get` permission on the key.
    pub async fn register_dependent(
        &self,
        name: &str,
        version: &str,
        dependent_id: &str,
        server_name: &str,
        description: &str,
    ) -> Result<Value, ClientError> {
        self.call(
            Method::PUT,
            &format!("/keys/{name}/{version}/dependents/{dependent_id}"),
            Some(json!({"name": server_name, "description": description})),
        )
        .await
    }

    /// Removes this identity's registration (after rewrapping to another key).
    pub async fn unregister_dependent(
        &self,
        name: &str,
        version: &str,
        dependent_id: &str,
    ) -> Result<(), ClientError> {
        self.call(
            Method::DELETE,
            &format!("/keys/{name}/{version}/dependents/{dependent_id}"),
            None,
        )
        .await
        .map(|_| ())
    }

    /// The dependents of one key version (`{"value": [...]}`).
    pub async fn list_dependents(&self, name: &str, version: &str) -> Result<Value, ClientError> {
        self.call(
            Method::GET,
            &format!("/keys/{name}/{version}/dependents"),
            None,
        )
        .await
    }
}

/// The admin API client.
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: Zeroizing<String>,
}

impl AdminClient {
    pub fn new(base: &str, ca_pem: &[u8], admin_token: &str) -> Result<Self, ClientError> {
        Ok(AdminClient {
            http: http_client(ca_pem, None)?,
            base: base.trim_end_matches('/').to_string(),
            token: Zeroizing::new(admin_token.trim().to_string()),
        })
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let url = format!("{}/admin{path}", self.base);
        let body = body.map(|b| serde_json::to_vec(&b).expect("serialize"));
        send(&self.http, method, &url, Some(&self.token), body)
            .await?
            .into_result()
    }

    /// Creates an identity; returns `(client_id, client_secret)`.
    pub async fn create_identity(
        &self,
        name: &str,
        permissions: &[&str],
    ) -> Result<(String, String), ClientError> {
        let v = self
            .call(
                Method::POST,
                "/identities",
                Some(json!({"name": name, "permissions": {"keys": permissions}})),
            )
            .await?;
        Ok((
            v["clientId"].as_str().unwrap_or_default().to_string(),
            v["clientSecret"].as_str().unwrap_or_default().to_string(),
        ))
    }

    /// Creates an identity that authenticates with a certificate (no
    /// secret is generated): `certificate_pem` is its public X.509
    /// certificate with an EC P-256 key; `client_id` a GUID to use (None:
    /// the vault generates one). Returns `(client_id, certificate_thumbprint)`
    /// (SHA-256 of the certificate, hex). 409 if the client id is taken.
    pub async fn create_identity_with_certificate(
        &self,
        name: &str,
        client_id: Option<&str>,
        certificate_pem: &str,
        managed: bool,
        permissions: &[&str],
    ) -> Result<(String, String), ClientError> {
        let mut body = json!({
            "name": name,
            "kind": if managed { "managedIdentity" } else { "servicePrincipal" },
            "certificate": certificate_pem,
            "permissions": {"keys": permissions},
        });
        if let Some(c) = client_id {
            body["clientId"] = json!(c);
        }
        let v = self.call(Method::POST, "/identities", Some(body)).await?;
        Ok((
            v["clientId"].as_str().unwrap_or_default().to_string(),
            v["certificateThumbprint"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ))
    }
}
