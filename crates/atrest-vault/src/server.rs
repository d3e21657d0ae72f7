//! HTTPS front end: TLS accept loop with graceful shutdown, request
//! parsing, authentication, firewall, fail-closed audit, and dispatch to
//! the data plane (`api`), the identity endpoints and the admin API
//! (`admin`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::audit::AuditLog;
use crate::auth::{TokenError, TokenSigner};
use crate::clock::Clock;
use crate::error::{ApiError, VaultError};
use crate::metrics::Metrics;
use crate::store::{Identity, Store};
use crate::timefmt;

/// Largest accepted request body. Azure's own limit for key operations is
/// far below this; a backup blob of a key with many versions fits.
pub const MAX_BODY: usize = 1024 * 1024;

/// Everything a request handler needs.
pub struct App {
    pub store: Store,
    pub audit: AuditLog,
    pub signer: TokenSigner,
    /// Fixed at creation; kept here so audit records can be built while a
    /// mutation holds the state lock.
    pub tenant: String,
    pub verified_tokens: crate::auth::VerifiedTokens,
    /// `jti`s of accepted client assertions (single use).
    pub assertion_replay: crate::certauth::ReplayCache,
    pub clock: Clock,
    pub admin_token_hash: String,
    pub test_clock: bool,
    pub token_lifetime: i64,
    pub metrics: Metrics,
    pub listen: SocketAddr,
}

/// A parsed request.
pub struct Req {
    pub method: Method,
    pub segments: Vec<String>,
    pub query: HashMap<String, String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub peer: IpAddr,
    pub host: String,
    pub correlation_id: String,
}

impl Req {
    pub fn base(&self) -> String {
        format!("https://{}", self.host)
    }
    pub fn json(&self) -> Result<Value, ApiError> {
        if self.body.is_empty() {
            return Err(ApiError::bad_parameter(
                "the request body is missing; a JSON object is required",
            ));
        }
        let v: Value = serde_json::from_slice(&self.body).map_err(|e| {
            ApiError::bad_parameter(format!("the request body is not valid JSON: {e}"))
        })?;
        if !v.is_object() {
            return Err(ApiError::bad_parameter(
                "the request body must be a JSON object",
            ));
        }
        Ok(v)
    }
    pub fn bearer(&self) -> Option<&str> {
        let h = self.headers.get("authorization")?.to_str().ok()?;
        let (scheme, tok) = h.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then_some(tok.trim())
    }
}

/// A successful answer.
pub struct Resp {
    pub status: u16,
    pub body: Option<Value>,
}

impl Resp {
    pub fn ok(v: Value) -> Self {
        Resp {
            status: 200,
            body: Some(v),
        }
    }
}

/// What the audit record says about the request, filled in as it is handled.
#[derive(Default)]
pub struct AuditInfo {
    pub operation: String,
    pub identity: Option<Identity>,
    pub key_name: Option<String>,
    pub key_version: Option<String>,
    pub api_version: Option<String>,
    pub started: Option<Instant>,
    /// Set when the record was already written (before a commit).
    pub audited: bool,
    /// How the caller authenticated at the token endpoint
    /// (`clientSecret` or `clientAssertion`).
    pub credential: Option<&'static str>,
    /// The operation overrode a safety check (`force=true`).
    pub forced: bool,
    /// Extra audit properties (e.g. the dependents a forced operation
    /// overrode).
    pub extra: Option<Value>,
}

fn sanitize_host(h: &str) -> Option<String> {
    let ok = !h.is_empty()
        && h.len() < 256
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c));
    ok.then(|| h.to_string())
}

fn url_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

async fn read_request(
    req: Request<Incoming>,
    peer: SocketAddr,
    listen: SocketAddr,
) -> Result<Req, (Req, ApiError)> {
    let (parts, body) = req.into_parts();
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            parts
                .headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .and_then(|h| sanitize_host(&h))
        .unwrap_or_else(|| listen.to_string());
    let segments: Vec<String> = parts
        .uri
        .path()
        .trim_start_matches('/')
        .split('/')
        .map(url_decode)
        .collect();
    let query = parts
        .uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let correlation_id = parts
        .headers
        .get("x-ms-client-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 64 && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .map(str::to_string)
        .unwrap_or_else(crate::store::new_guid);
    let declared = parts
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let mut req = Req {
        method: parts.method,
        segments,
        query,
        headers: parts.headers,
        body: Bytes::new(),
        peer: peer.ip(),
        host,
        correlation_id,
    };
    if declared.is_some_and(|len| len > MAX_BODY) {
        return Err((req, too_large()));
    }
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => {
            req.body = b.to_bytes();
            Ok(req)
        }
        Err(e) => {
            let err = if e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large()
            } else {
                ApiError::bad_request("the request body could not be read")
            };
            Err((req, err))
        }
    }
}

/// Requests that cannot change state (so never call `App::mutate`).
fn read_only(req: &Req) -> bool {
    let s = &req.segments;
    match req.method {
        Method::GET => true,
        Method::POST => {
            (s.len() == 4
                && s[0] == "keys"
                && matches!(
                    s[3].to_ascii_lowercase().as_str(),
                    "wrapkey" | "unwrapkey" | "encrypt" | "decrypt" | "sign" | "verify"
                ))
                || (s.len() >= 3 && s[1] == "oauth2")
        }
        _ => false,
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        413,
        "RequestEntityTooLarge",
        format!("the request body exceeds {MAX_BODY} bytes"),
    )
}

fn json_response(
    status: u16,
    body: Option<&Value>,
    extra: &[(String, String)],
    corr: &str,
) -> Response<Full<Bytes>> {
    let bytes = body
        .map(|b| Bytes::from(serde_json::to_vec(b).expect("serialize")))
        .unwrap_or_default();
    let mut r = Response::new(Full::new(bytes));
    *r.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    if body.is_some() {
        h.insert(
            "content-type",
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
    }
    if let Ok(v) = HeaderValue::from_str(corr) {
        h.insert("x-ms-request-id", v);
    }
    for (k, v) in extra {
        if let (Ok(k), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.insert(k, v);
        }
    }
    r
}

fn text_response(status: u16, ctype: &'static str, text: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static(ctype));
    r
}

/// The 401 answer with Azure's challenge.
pub fn unauthorized(req: &Req, tenant: &str, message: String) -> ApiError {
    let mut e = ApiError::new(401, "Unauthorized", message);
    e.headers.push((
        "www-authenticate".into(),
        format!(
            "Bearer authorization=\"{}/{tenant}\", resource=\"{}\"",
            req.base(),
            crate::auth::AUDIENCE
        ),
    ));
    e
}

impl App {
    /// Runs a state change whose audit record is written before it commits:
    /// if the record cannot be written the change is rolled back and the
    /// request is refused (fail-closed for mutations, not just answers).
    pub fn mutate(
        &self,
        req: &Req,
        info: &mut AuditInfo,
        f: impl FnOnce(&mut crate::store::State, &crate::store::Tx<'_>) -> Result<Resp, ApiError>,
    ) -> Result<Resp, ApiError> {
        let started = info.started.unwrap_or_else(Instant::now);
        self.store
            .mutate_hooked(f, |resp: &Resp, tx| -> Result<(), ApiError> {
                if info.key_version.is_none() {
                    info.key_version = resp
                        .body
                        .as_ref()
                        .and_then(|b| b["key"]["kid"].as_str())
                        .and_then(|k| k.rsplit('/').next())
                        .map(str::to_string);
                }
                let rec = self.audit_record(req, info, resp.status, None, started);
                let (seq, hash) = self.audit.write_blocking(rec).map_err(|e| {
                    self.metrics.audit_failure();
                    ApiError::from(e)
                })?;
                // In the same transaction: the vault remembers where its
                // log must reach, so a log cut short is caught by verify.
                tx.put_audit_head(seq, &hash)?;
                info.audited = true;
                Ok(())
            })
    }

    /// Authenticates a data-plane request and applies the firewall.
    pub fn authenticate(&self, req: &Req, info: &mut AuditInfo) -> Result<Identity, ApiError> {
        let snap = self.store.snapshot();
        let tenant = &snap.props.tenant_id;
        let Some(token) = req.bearer() else {
            return Err(unauthorized(
                req,
                tenant,
                "AKV10000: Request is missing a Bearer token.".into(),
            ));
        };
        let claims = self
            .verified_tokens
            .verify(&self.signer, token, tenant, self.clock.now())
            .map_err(|e: TokenError| {
                unauthorized(req, tenant, format!("AKV10032: Invalid token: {e}."))
            })?;
        let Some(id) = snap.identities.get(&claims.client_id) else {
            return Err(unauthorized(
                req,
                tenant,
                "AKV10032: Invalid token: the identity it was issued to no longer exists.".into(),
            ));
        };
        info.identity = Some(id.clone());
        if !crate::firewall::allows(&snap.props.firewall, req.peer) && !id.bypass_firewall {
            return Err(ApiError::forbidden(
                format!(
                    "Client address is not authorized and caller is not a trusted service.\r\nClient address: {}\r\nCaller: appid={};oid={}\r\nVault: {}",
                    req.peer, id.client_id, id.client_id, req.host
                ),
                "ForbiddenByFirewall",
            ));
        }
        Ok(id.clone())
    }

    fn audit_record(
        &self,
        req: &Req,
        info: &AuditInfo,
        status: u16,
        err: Option<&ApiError>,
        started: Instant,
    ) -> Value {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_millis())
            .unwrap_or(0);
        let identity = info.identity.as_ref().map(|id| {
            json!({"claim": {"appid": id.client_id, "oid": id.client_id, "name": id.name,
                              "tid": self.tenant}})
        });
        let key_id = info.key_name.as_ref().map(|n| match &info.key_version {
            Some(v) if !v.is_empty() => format!("{}/keys/{n}/{v}", req.base()),
            _ => format!("{}/keys/{n}", req.base()),
        });
        let mut rec = json!({
            "time": timefmt::rfc3339(self.clock.now(), now_ms),
            "resourceId": req.base(),
            "operationName": info.operation,
            "operationVersion": info.api_version,
            "category": "AuditEvent",
            "resultType": if status < 400 { "Success" } else { "Failure" },
            "resultSignature": hyper::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or(""),
            "resultDescription": err.map(|e| e.inner.clone().unwrap_or_else(|| e.code.clone())),
            "durationMs": started.elapsed().as_millis() as u64,
            "callerIpAddress": req.peer.to_string(),
            "correlationId": req.correlation_id,
            "identity": identity,
            "properties": {
                "id": key_id,
                "keyName": info.key_name,
                "keyVersion": info.key_version,
                "requestUri": format!("{}/{}", req.base(), req.segments.join("/")),
                "httpStatusCode": status,
                "clientInfo": req.headers.get("user-agent").and_then(|v| v.to_str().ok()).map(|s| s.chars().take(200).collect::<String>()),
            }
        });
        if let Some(c) = info.credential {
            rec["properties"]["credentialType"] = json!(c);
        }
        if info.forced {
            rec["properties"]["forced"] = json!(true);
        }
        if let Some(x) = &info.extra {
            rec["properties"]["details"] = x.clone();
        }
        rec
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let req = match read_request(req, peer, self.listen).await {
            Ok(r) => r,
            Err((req, e)) => {
                // Refused before routing; still audited.
                let info = AuditInfo {
                    operation: "RequestRejected".into(),
                    api_version: req.query.get("api-version").cloned(),
                    ..Default::default()
                };
                return self.finish(req, info, Err(e), started).await;
            }
        };
        let first = req.segments.first().map(String::as_str).unwrap_or("");
        match (first, req.segments.len()) {
            ("healthz", 1) => return self.health(),
            ("metrics", 1) => {
                return text_response(200, "text/plain; version=0.0.4", self.metrics.render(&self))
            }
            _ => {}
        }
        let mut info = AuditInfo {
            api_version: req.query.get("api-version").cloned(),
            started: Some(started),
            ..Default::default()
        };
        // Fail closed: no audit log, no work at all.
        let result = match self.audit.probe() {
            Err(e) => Err(ApiError::from(e)),
            Ok(()) if read_only(&req) => {
                // Reads and crypto operations run on the async worker: no
                // thread hand-off, and they never wait on a commit.
                let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.dispatch(&req, &mut info)
                }))
                .unwrap_or_else(|_| {
                    tracing::error!("request handler panicked");
                    Err(ApiError::internal("internal error; see the vault's log"))
                });
                return self.finish(req, info, res, started).await;
            }
            Ok(()) => {
                // State changes block on SQLite and on the audit sync inside
                // their transaction: keep them off the async workers.
                let app = self.clone();
                let joined = tokio::task::spawn_blocking(move || {
                    let res = app.dispatch(&req, &mut info);
                    (res, info, req)
                })
                .await;
                return match joined {
                    Ok((res, info, req)) => self.finish(req, info, res, started).await,
                    Err(_) => {
                        // A bug, not bad input: answer 500 without details.
                        let e = ApiError::internal("internal error; see the vault's log");
                        tracing::error!("request handler panicked");
                        json_response(e.status, Some(&e.body()), &[], "-")
                    }
                };
            }
        };
        self.finish(req, info, result, started).await
    }

    async fn finish(
        &self,
        req: Req,
        info: AuditInfo,
        res: Result<Resp, ApiError>,
        started: Instant,
    ) -> Response<Full<Bytes>> {
        let (status, err) = match &res {
            Ok(r) => (r.status, None),
            Err(e) => (e.status, Some(e)),
        };
        let op = if info.operation.is_empty() {
            "Unknown"
        } else {
            info.operation.as_str()
        };
        let rec = self.audit_record(&req, &info, status, err, started);
        if let Err(e) = if info.audited {
            Ok(())
        } else {
            self.audit.write(rec).await
        } {
            self.metrics.audit_failure();
            let e = ApiError::from(e);
            self.metrics.record(op, e.status, started.elapsed());
            return json_response(e.status, Some(&e.body()), &[], &req.correlation_id);
        }
        self.metrics.record(op, status, started.elapsed());
        tracing::info!(
            op,
            status,
            caller = %req.peer,
            identity = info.identity.as_ref().map(|i| i.client_id.as_str()).unwrap_or("-"),
            key = info.key_name.as_deref().unwrap_or("-"),
            ms = started.elapsed().as_millis() as u64,
            "request"
        );
        match res {
            Ok(r) => json_response(r.status, r.body.as_ref(), &[], &req.correlation_id),
            Err(e) => {
                let body = crate::admin::token_error_body(&e).unwrap_or_else(|| e.body());
                json_response(e.status, Some(&body), &e.headers, &req.correlation_id)
            }
        }
    }

    fn health(&self) -> Response<Full<Bytes>> {
        let audit = self
            .audit
            .probe()
            .err()
            .map(|e| e.to_string())
            .or_else(|| self.audit.failure());
        match audit {
            None => json_response(200, Some(&json!({"status": "ok"})), &[], "-"),
            Some(why) => json_response(
                503,
                Some(&json!({"status": "unavailable", "reason": format!("audit log: {why}")})),
                &[],
                "-",
            ),
        }
    }

    fn dispatch(&self, req: &Req, info: &mut AuditInfo) -> Result<Resp, ApiError> {
        let first = req.segments.first().map(String::as_str).unwrap_or("");
        match first {
            "keys" | "deletedkeys" => crate::api::dispatch(self, req, info),
            "admin" => crate::admin::dispatch(self, req, info),
            _ => crate::admin::identity_endpoints(self, req, info),
        }
    }

    /// One lifecycle pass: purge expired soft-deleted keys, execute
    /// rotation policies.
    pub fn maintenance(&self) -> Result<crate::lifecycle::Maintenance, VaultError> {
        crate::lifecycle::run(self)
    }
}

/// Runs the HTTPS server until `shutdown` resolves, then drains
/// connections for up to 10 seconds.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    tls: rustls::ServerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let sweeper = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tick.tick().await;
                let a = app.clone();
                match tokio::task::spawn_blocking(move || a.maintenance()).await {
                    Ok(Ok(m)) if !m.purged.is_empty() || !m.rotated.is_empty() => {
                        tracing::info!(purged = ?m.purged, rotated = ?m.rotated, "key lifecycle")
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "key lifecycle pass failed"),
                    _ => {}
                }
            }
        })
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            res = listener.accept() => {
                let (tcp, peer) = match res {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let app = app.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let app = app.clone();
                        async move { Ok::<_, std::convert::Infallible>(app.handle(req, peer).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(error = %e, %peer, "connection ended with error");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    sweeper.abort();
    tracing::info!("shutting down: draining connections");
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(10)) => tracing::warn!("drain timed out"),
    }
}
