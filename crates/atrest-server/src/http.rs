//! The HTTP endpoints a running server offers on `--metrics-listen`,
//! whatever its engine: `/metrics` (Prometheus text format), `/status`
//! (the JSON of `atrest server status`) and `/healthz`.

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use tokio::net::TcpListener;

use crate::lifecycle::Lifecycle;
use crate::resource;

/// What an engine adds to the endpoints.
pub trait Observe: Send + Sync + 'static {
    /// Its metrics, in the text exposition format (the state gauge is
    /// added here, from the lifecycle).
    fn metrics(&self) -> String;
    /// Adds its live figures to `/status`.
    fn status(&self, _status: &mut serde_json::Value) {}
}

/// The `atrest_server_state` gauge.
pub fn state_gauge(state: resource::State) -> String {
    format!(
        "# HELP atrest_server_state The server's state (1 for the current one).\n# TYPE atrest_server_state gauge\natrest_server_state{{state=\"{state}\"}} 1\n"
    )
}

/// Serves the endpoints until the task is dropped.
pub async fn serve(listener: TcpListener, lifecycle: Arc<Lifecycle>, engine: Arc<dyn Observe>) {
    use hyper::service::service_fn;
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let (l, e) = (Arc::clone(&lifecycle), Arc::clone(&engine));
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (l, e) = (Arc::clone(&l), Arc::clone(&e));
                async move {
                    let (status, ctype, body) = match req.uri().path() {
                        "/metrics" => (
                            200,
                            "text/plain; version=0.0.4",
                            state_gauge(l.state()) + &e.metrics(),
                        ),
                        "/status" => match resource::status(l.dir()) {
                            Ok(mut v) => {
                                e.status(&mut v);
                                (200, "application/json", v.to_string())
                            }
                            Err(err) => (500, "text/plain", err.to_string()),
                        },
                        "/healthz" => (200, "text/plain", "ok\n".to_string()),
                        _ => (404, "text/plain", "not found\n".to_string()),
                    };
                    hyper::Response::builder()
                        .status(status)
                        .header("content-type", ctype)
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                .await;
        });
    }
}
