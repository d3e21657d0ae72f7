//! One client connection: TLS negotiation, startup, SCRAM, then the
//! message pump between the socket and the session thread.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::{SinkExt, StreamExt};
use pgwire::error::PgWireError;
use pgwire::messages::response::{GssEncResponse, ReadyForQuery, SslResponse, TransactionStatus};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey,
};
use pgwire::messages::{
    DecodeContext, PgWireBackendMessage as B, PgWireFrontendMessage as F, ProtocolVersion,
    SslNegotiationMetaMessage,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder, Framed};

use crate::config::PlaintextPolicy;
use crate::ctx::ServerCtx;
use crate::error::PgError;
use crate::resource::State;
use crate::scram::{self, Binding, ScramServer, ScramVerifier};
use crate::session::{self, Job, Out, SessionConfig, SessionShared};

/// Frames PostgreSQL messages with a size limit on what clients send.
pub struct PgCodec {
    ctx: DecodeContext,
    max_message: usize,
}

impl PgCodec {
    fn new(max_message: usize) -> Self {
        let mut ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_0);
        ctx.awaiting_frontend_ssl = true;
        ctx.awaiting_frontend_startup = true;
        PgCodec { ctx, max_message }
    }
}

impl Decoder for PgCodec {
    type Item = F;
    type Error = PgWireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<F>, PgWireError> {
        // Refuse oversized messages before buffering them.
        let len_at = if self.ctx.awaiting_frontend_startup {
            0
        } else {
            1
        };
        if src.len() >= len_at + 4 {
            // Unsigned: a length of 2^31 is that, not a negative number.
            let len = (&src[len_at..len_at + 4]).get_u32() as usize;
            if len < 4 {
                return Err(PgWireError::ApiError(Box::new(BadLength(len))));
            }
            if len > self.max_message {
                return Err(PgWireError::MessageTooLarge(self.max_message, len));
            }
        }
        loop {
            let msg = F::decode(src, &self.ctx)?;
            match msg {
                Some(F::SslNegotiation(SslNegotiationMetaMessage::None)) => {
                    // Not SSL or GSS: a startup or cancel packet follows.
                    self.ctx.awaiting_frontend_ssl = false;
                    continue;
                }
                other => return Ok(other),
            }
        }
    }
}

impl Encoder<B> for PgCodec {
    type Error = io::Error;

    fn encode(&mut self, item: B, dst: &mut BytesMut) -> Result<(), io::Error> {
        item.encode(dst)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

/// A plaintext or TLS socket.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

type Conn = Framed<Stream, PgCodec>;

async fn send_fatal(conn: &mut Conn, e: &PgError) {
    let _ = conn.send(B::ErrorResponse(e.to_response())).await;
}

/// A message length below 4 (it counts its own 4 bytes).
#[derive(Debug, thiserror::Error)]
#[error("invalid message length {0}: a length counts its own 4 bytes, so it is at least 4")]
struct BadLength(usize);

fn describe_decode_error(e: &PgWireError) -> PgError {
    match e {
        PgWireError::ApiError(inner) if inner.is::<BadLength>() => {
            PgError::fatal("08P01", inner.to_string())
        }
        PgWireError::MessageTooLarge(max, got) => PgError::fatal(
            "54000",
            format!("message of {got} bytes exceeds the server's limit of {max} bytes (max_message_bytes)"),
        ),
        other => PgError::fatal("08P01", format!("invalid frontend message: {other}")),
    }
}

/// Serves one accepted socket until it closes.
pub async fn handle(tcp: TcpStream, peer: SocketAddr, ctx: Arc<ServerCtx>) {
    let _ = tcp.set_nodelay(true);
    // A TLS record first (no SSLRequest): direct TLS. Without ALPN
    // `postgresql` it is a replica calling (see crate::replication).
    let mut first = [0u8; 1];
    if matches!(tcp.peek(&mut first).await, Ok(1)) && first[0] == 0x16 {
        let accepted = tokio::time::timeout(
            Duration::from_millis(ctx.limits.authentication_timeout_ms),
            ctx.replication_tls.accept(tcp),
        )
        .await;
        match accepted {
            Ok(Ok(tls)) => crate::replication::serve(tls, peer, ctx).await,
            _ => {
                tracing::info!(%peer, "direct TLS handshake failed");
                ctx.metrics.rejected("tls_handshake");
            }
        }
        return;
    }
    let auth_timeout = Duration::from_millis(ctx.limits.authentication_timeout_ms);
    let started = tokio::time::timeout(auth_timeout, startup(tcp, peer, &ctx)).await;
    let (mut conn, session) = match started {
        Ok(Some(x)) => x,
        Ok(None) => return,
        Err(_) => {
            tracing::info!(%peer, "authentication timed out");
            ctx.metrics.rejected("authentication_timeout");
            return;
        }
    };
    ctx.metrics
        .connections_active
        .fetch_add(1, Ordering::Relaxed);
    let shared = Arc::clone(&session.shared);
    tracing::info!(%peer, pid = shared.pid, user = %shared.user, database = %shared.database, "session started");
    let _ = conn.flush().await;
    run_session(conn, session, &ctx).await;
    shared.terminate();
    ctx.unregister(shared.pid);
    ctx.metrics
        .connections_active
        .fetch_sub(1, Ordering::Relaxed);
    tracing::info!(%peer, pid = shared.pid, "session ended");
}

/// TLS negotiation, the startup packet, cancel requests and SCRAM.
/// Returns the authenticated connection and its started session.
async fn startup(
    tcp: TcpStream,
    peer: SocketAddr,
    ctx: &Arc<ServerCtx>,
) -> Option<(Conn, session::SessionHandle)> {
    let mut conn: Conn = Framed::new(Stream::Plain(tcp), PgCodec::new(16 * 1024));
    let mut tls = false;
    let startup = loop {
        let msg = match conn.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::info!(%peer, error = %e, "bad startup packet");
                ctx.metrics.rejected("bad_startup_packet");
                send_fatal(&mut conn, &describe_decode_error(&e)).await;
                return None;
            }
            None => return None,
        };
        match msg {
            F::SslNegotiation(SslNegotiationMetaMessage::PostgresSsl(_)) if !tls => {
                conn.send(B::SslResponse(SslResponse::Accept)).await.ok()?;
                let parts = conn.into_parts();
                if !parts.read_buf.is_empty() {
                    // Bytes sent before the TLS handshake could be injected
                    // by a man in the middle (CVE-2021-23214): refuse.
                    tracing::warn!(%peer, "data received before the TLS handshake");
                    return None;
                }
                let Stream::Plain(tcp) = parts.io else {
                    return None;
                };
                let tls_stream = match ctx.tls.accept(tcp).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::info!(%peer, error = %e, "TLS handshake failed");
                        ctx.metrics.rejected("tls_handshake");
                        return None;
                    }
                };
                let mut codec = PgCodec::new(16 * 1024);
                codec.ctx.awaiting_frontend_ssl = false;
                conn = Framed::new(Stream::Tls(Box::new(tls_stream)), codec);
                tls = true;
            }
            F::SslNegotiation(SslNegotiationMetaMessage::PostgresGss(_)) => {
                conn.send(B::GssEncResponse(GssEncResponse::Refuse))
                    .await
                    .ok()?;
            }
            F::CancelRequest(c) => {
                let secret = match c.secret_key {
                    SecretKey::I32(s) => s,
                    SecretKey::Bytes(_) => return None,
                };
                if ctx.cancel(c.pid, secret) {
                    ctx.metrics.cancels.fetch_add(1, Ordering::Relaxed);
                }
                return None;
            }
            F::Startup(s) => break s,
            _ => {
                send_fatal(
                    &mut conn,
                    &PgError::fatal("08P01", "expected a startup packet"),
                )
                .await;
                return None;
            }
        }
    };
    conn.codec_mut().ctx.awaiting_frontend_ssl = false;
    conn.codec_mut().ctx.awaiting_frontend_startup = false;
    conn.codec_mut().max_message = ctx.limits.max_message_bytes;

    let reject = |code: &'static str, msg: String| PgError::fatal(code, msg);
    if startup.protocol_number_major != 3 {
        send_fatal(
            &mut conn,
            &reject(
                "0A000",
                format!(
                    "unsupported frontend protocol {}.{}: atrest speaks 3.0",
                    startup.protocol_number_major, startup.protocol_number_minor
                ),
            ),
        )
        .await;
        return None;
    }
    let unsupported: Vec<String> = startup
        .parameters
        .keys()
        .filter(|k| k.starts_with("_pq_."))
        .cloned()
        .collect();
    if startup.protocol_number_minor > 0 || !unsupported.is_empty() {
        conn.send(B::NegotiateProtocolVersion(NegotiateProtocolVersion::new(
            0,
            unsupported,
        )))
        .await
        .ok()?;
    }
    let user = startup.parameters.get("user").cloned().unwrap_or_default();
    if user.is_empty() {
        send_fatal(
            &mut conn,
            &reject(
                "28000",
                "no PostgreSQL user name specified in startup packet".into(),
            ),
        )
        .await;
        return None;
    }
    let database = startup
        .parameters
        .get("database")
        .filter(|d| !d.is_empty())
        .cloned()
        .unwrap_or_else(|| user.clone());
    if startup
        .parameters
        .get("replication")
        .is_some_and(|r| r != "false" && r != "0")
    {
        send_fatal(
            &mut conn,
            &reject("0A000", "replication connections are not supported".into()),
        )
        .await;
        return None;
    }
    let loopback = peer.ip().is_loopback();
    let plaintext_ok = match ctx.config.allow_plaintext {
        PlaintextPolicy::Always => true,
        PlaintextPolicy::Loopback => loopback,
        PlaintextPolicy::Never => false,
    };
    if !tls && !plaintext_ok {
        ctx.metrics.rejected("tls_required");
        send_fatal(
            &mut conn,
            &reject(
                "28000",
                format!("connection from {} requires TLS", peer.ip()),
            )
            .hint("Connect with sslmode=require (or verify-full with the server's CA)."),
        )
        .await;
        return None;
    }
    match ctx.state() {
        State::Ready => {}
        State::Inaccessible => {
            ctx.metrics.rejected("inaccessible");
            send_fatal(&mut conn, &ctx.inaccessible_error()).await;
            return None;
        }
        // Stopping (no connection is accepted before Ready).
        _ => {
            ctx.metrics.rejected("shutting_down");
            send_fatal(
                &mut conn,
                &reject("57P03", "the database system is shutting down".into()),
            )
            .await;
            return None;
        }
    }

    // SCRAM-SHA-256(-PLUS).
    let binding = if tls {
        match &ctx.channel_binding {
            Some(h) => Binding::Tls(h.clone()),
            None => Binding::Plain,
        }
    } else {
        Binding::Plain
    };
    let role = ctx.role(&user);
    let verifier = role
        .as_ref()
        .and_then(|r| ScramVerifier::parse(&r.verifier));
    let superuser = role.as_ref().is_some_and(|r| r.superuser);
    let mut scram = ScramServer::new(&user, verifier, binding.clone(), ctx.mock_key.as_bytes());
    conn.send(B::Authentication(Authentication::SASL(scram::mechanisms(
        &binding,
    ))))
    .await
    .ok()?;
    let auth_fail = |e: scram::AuthFailure| PgError::fatal(e.code, e.message);
    let first = match conn.next().await {
        Some(Ok(F::PasswordMessageFamily(p))) => match p.into_sasl_initial_response() {
            Ok(r) => r,
            Err(e) => {
                send_fatal(
                    &mut conn,
                    &PgError::fatal("08P01", format!("expected SASLInitialResponse: {e}")),
                )
                .await;
                return None;
            }
        },
        _ => return None,
    };
    let server_first =
        match scram.client_first(&first.auth_method, first.data.as_deref().unwrap_or(&[])) {
            Ok(s) => s,
            Err(e) => {
                ctx.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
                send_fatal(&mut conn, &auth_fail(e)).await;
                return None;
            }
        };
    conn.send(B::Authentication(Authentication::SASLContinue(
        server_first.into_bytes().into(),
    )))
    .await
    .ok()?;
    let fin = match conn.next().await {
        Some(Ok(F::PasswordMessageFamily(p))) => match p.into_sasl_response() {
            Ok(r) => r,
            Err(e) => {
                send_fatal(
                    &mut conn,
                    &PgError::fatal("08P01", format!("expected SASLResponse: {e}")),
                )
                .await;
                return None;
            }
        },
        _ => return None,
    };
    let server_final = match scram.client_final(&fin.data) {
        Ok(s) => s,
        Err(e) => {
            ctx.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, user = %user, "authentication failed");
            send_fatal(&mut conn, &auth_fail(e)).await;
            return None;
        }
    };
    conn.feed(B::Authentication(Authentication::SASLFinal(
        server_final.into_bytes().into(),
    )))
    .await
    .ok()?;
    conn.feed(B::Authentication(Authentication::Ok))
        .await
        .ok()?;

    // Admission: connection limit, then the session and its database.
    let Some(shared) =
        ctx.admit(|pid, secret| Arc::new(SessionShared::new(pid, secret, &user, &database)))
    else {
        ctx.metrics.rejected("too_many_connections");
        send_fatal(
            &mut conn,
            &reject(
                "53300",
                format!(
                    "sorry, too many clients already (max_connections = {})",
                    ctx.limits.max_connections
                ),
            ),
        )
        .await;
        return None;
    };
    let (pid, secret) = (shared.pid, shared.secret);
    let cfg = SessionConfig {
        databases: Arc::clone(&ctx.databases),
        limits: ctx.limits.clone(),
        metrics: Arc::clone(&ctx.metrics),
        user: user.clone(),
        superuser,
        application_name: startup
            .parameters
            .get("application_name")
            .cloned()
            .unwrap_or_default(),
        scenario: ctx.config.encryption.scenario.clone(),
        server_name: ctx.config.name.clone(),
    };
    let (handle, params) = match session::start(cfg, Arc::clone(&shared)) {
        Ok(x) => x,
        Err(e) => {
            ctx.unregister(pid);
            send_fatal(&mut conn, &e).await;
            return None;
        }
    };
    ctx.metrics
        .connections_total
        .fetch_add(1, Ordering::Relaxed);
    for (k, v) in params {
        conn.feed(B::ParameterStatus(ParameterStatus::new(k, v)))
            .await
            .ok()?;
    }
    conn.feed(B::BackendKeyData(BackendKeyData::new(
        pid,
        SecretKey::I32(secret),
    )))
    .await
    .ok()?;
    conn.feed(B::ReadyForQuery(ReadyForQuery::new(
        TransactionStatus::Idle,
    )))
    .await
    .ok()?;
    Some((conn, handle))
}

/// How a session loop ended.
enum End {
    ClientGone,
    Fatal,
}

async fn run_session(conn: Conn, mut session: session::SessionHandle, ctx: &Arc<ServerCtx>) {
    let shared = Arc::clone(&session.shared);
    let (mut sink, mut stream) = conn.split();
    let mut pending: VecDeque<Result<F, PgWireError>> = VecDeque::new();
    let mut eof = false;
    let mut terminated = false;
    let mut shutdown = ctx.shutdown_watch();
    let mut kick = ctx.kick_watch();
    let end = 'outer: loop {
        // The next message: pipelined ones first.
        let msg = match pending.pop_front() {
            Some(m) => m,
            None => {
                if eof {
                    break End::ClientGone;
                }
                let idle_limit = if shared.in_transaction() {
                    ctx.limits.idle_in_transaction_session_timeout_ms
                } else {
                    ctx.limits.idle_session_timeout_ms
                };
                if *shutdown.borrow() && !shared.in_transaction() {
                    let _ = sink
                        .send(B::ErrorResponse(
                            PgError::fatal(
                                "57P01",
                                "terminating connection due to administrator command",
                            )
                            .to_response(),
                        ))
                        .await;
                    break End::Fatal;
                }
                let idle = async {
                    if idle_limit == 0 {
                        std::future::pending::<()>().await
                    } else {
                        tokio::time::sleep(Duration::from_millis(idle_limit)).await
                    }
                };
                tokio::select! {
                    m = stream.next() => match m {
                        Some(m) => m,
                        None => break End::ClientGone,
                    },
                    _ = idle => {
                        let e = if shared.in_transaction() {
                            PgError::fatal("25P03", "terminating connection due to idle-in-transaction timeout")
                        } else {
                            PgError::fatal("57P05", "terminating connection due to idle-session timeout")
                        };
                        let _ = sink.send(B::ErrorResponse(e.to_response())).await;
                        break End::Fatal;
                    }
                    _ = shutdown.changed() => continue 'outer,
                    _ = kick.changed() => {
                        let _ = sink.send(B::ErrorResponse(ctx.inaccessible_error().to_response())).await;
                        break End::Fatal;
                    }
                    _ = ctx.grace_over() => {
                        let _ = sink.send(B::ErrorResponse(
                            PgError::fatal("57P01", "terminating connection due to administrator command")
                                .detail("The server is shutting down; the open transaction was rolled back.")
                                .to_response(),
                        )).await;
                        break End::Fatal;
                    }
                }
            }
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                let _ = sink
                    .send(B::ErrorResponse(describe_decode_error(&e).to_response()))
                    .await;
                break End::Fatal;
            }
        };
        let job = match msg {
            F::Terminate(_) => break End::ClientGone,
            F::Query(q) => Job::Query(q.query),
            F::Parse(p) => Job::Parse(p),
            F::Bind(b) => Job::Bind(b),
            F::Describe(d) => Job::Describe(d),
            F::Execute(e) => Job::Execute(e),
            F::Close(c) => Job::Close(c),
            F::Sync(_) => Job::Sync,
            F::Flush(_) => Job::Flush,
            F::CopyData(_) | F::CopyDone(_) | F::CopyFail(_) => continue,
            other => {
                let e = PgError::fatal(
                    "08P01",
                    format!(
                        "unexpected message during a session: {}",
                        message_name(&other)
                    ),
                );
                let _ = sink.send(B::ErrorResponse(e.to_response())).await;
                break End::Fatal;
            }
        };
        if !session.submit(job) {
            break End::Fatal;
        }
        // Pump the session's answers; keep reading so a disconnect or a
        // pipelined message is seen while a statement runs.
        loop {
            tokio::select! {
                biased;
                out = session.out.recv() => match out {
                    Some(Out::Messages(batch)) => {
                        for m in batch {
                            if sink.feed(m).await.is_err() {
                                shared.terminate();
                                eof = true;
                            }
                        }
                    }
                    Some(Out::Flush) => {
                        if sink.flush().await.is_err() {
                            shared.terminate();
                            eof = true;
                        }
                    }
                    Some(Out::Done) => break,
                    Some(Out::Closed) | None => {
                        let _ = sink.flush().await;
                        break 'outer End::Fatal;
                    }
                },
                m = stream.next(), if !eof && pending.len() < 1024 => match m {
                    Some(m) => pending.push_back(m),
                    None => {
                        // The client went away mid-statement: stop it; the
                        // open transaction rolls back with the session.
                        eof = true;
                        shared.terminate();
                    }
                },
                _ = ctx.grace_over(), if !terminated => {
                    terminated = true;
                    shared.terminate();
                }
                _ = kick.changed(), if !terminated => {
                    // The key became inaccessible mid-statement: stop it;
                    // the session then ends with the key's error.
                    shared.terminate();
                    let _ = sink.send(B::ErrorResponse(ctx.inaccessible_error().to_response())).await;
                    let _ = sink.flush().await;
                    break 'outer End::Fatal;
                }
            }
        }
    };
    let _ = sink.flush().await;
    let _ = sink.close().await;
    if let End::ClientGone = end {
        tracing::debug!(pid = shared.pid, "client disconnected");
    }
}

fn message_name(m: &F) -> &'static str {
    match m {
        F::Startup(_) => "Startup",
        F::PasswordMessageFamily(_) => "PasswordMessage",
        F::CancelRequest(_) => "CancelRequest",
        F::SslNegotiation(_) => "SSLRequest",
        _ => "message",
    }
}
