//! While a postgres-engine server is Inaccessible, PostgreSQL is stopped
//! and its port answers every startup itself: SQLSTATE 57P03 and why, in
//! the words [`crate::control::Control::inaccessible_error`] allows before
//! authentication. TLS is offered with the server's own certificate, so a
//! client that requires TLS reads the error too.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::control::Control;
use crate::error::PgError;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// The longest startup packet read (PostgreSQL's own limit is 10,000).
const MAX_STARTUP: usize = 10_000;

/// Answers every connection on `listener` with the Inaccessible error
/// until the task is aborted.
pub async fn refuse(listener: TcpListener, tls: Option<TlsAcceptor>, control: Arc<Control>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (tls, control) = (tls.clone(), Arc::clone(&control));
        tokio::spawn(async move {
            let answer = async {
                let mut tcp = tcp;
                match read_request(&mut tcp).await? {
                    Request::Ssl if tls.is_some() => {
                        tcp.write_all(b"S").await?;
                        let acceptor = tls.expect("checked");
                        let mut s = acceptor.accept(tcp).await?;
                        if let Request::Startup = read_request(&mut s).await? {
                            send_error(&mut s, &control.inaccessible_error()).await?;
                        }
                        s.shutdown().await
                    }
                    Request::Ssl | Request::Gss => {
                        tcp.write_all(b"N").await?;
                        if let Request::Startup = read_request(&mut tcp).await? {
                            send_error(&mut tcp, &control.inaccessible_error()).await?;
                        }
                        Ok(())
                    }
                    Request::Startup => send_error(&mut tcp, &control.inaccessible_error()).await,
                    Request::Cancel => Ok(()),
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), answer).await;
        });
    }
}

enum Request {
    Ssl,
    Gss,
    Cancel,
    Startup,
}

async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Request> {
    let len = s.read_u32().await? as usize;
    if !(8..=MAX_STARTUP).contains(&len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "invalid startup packet length",
        ));
    }
    let code = s.read_u32().await?;
    let mut rest = vec![0u8; len - 8];
    s.read_exact(&mut rest).await?;
    Ok(match code {
        SSL_REQUEST => Request::Ssl,
        GSSENC_REQUEST => Request::Gss,
        CANCEL_REQUEST => Request::Cancel,
        _ => Request::Startup,
    })
}

/// An ErrorResponse ('E', then each field as its type byte and a
/// NUL-terminated string, then a NUL).
fn encode(e: &PgError) -> Vec<u8> {
    let mut body = Vec::new();
    let mut field = |t: u8, v: &str| {
        body.push(t);
        body.extend(v.bytes().filter(|&b| b != 0));
        body.push(0);
    };
    field(b'S', e.severity);
    field(b'V', e.severity);
    field(b'C', e.code);
    field(b'M', &e.message);
    if let Some(d) = &e.detail {
        field(b'D', d);
    }
    if let Some(h) = &e.hint {
        field(b'H', h);
    }
    body.push(0);
    let mut out = vec![b'E'];
    out.extend(((body.len() + 4) as u32).to_be_bytes());
    out.extend(body);
    out
}

async fn send_error<S: AsyncWrite + Unpin>(s: &mut S, e: &PgError) -> std::io::Result<()> {
    s.write_all(&encode(e)).await?;
    s.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_response_is_framed_as_postgresql_frames_it() {
        let e = PgError::fatal("57P03", "server s is Inaccessible").hint("revalidate");
        let b = encode(&e);
        assert_eq!(b[0], b'E');
        let len = u32::from_be_bytes(b[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, b.len() - 1);
        let fields: Vec<&[u8]> = b[5..b.len() - 1].split(|&x| x == 0).collect();
        assert!(fields.contains(&&b"C57P03"[..]));
        assert!(fields.contains(&&b"SFATAL"[..]));
        assert!(fields.contains(&&b"Mserver s is Inaccessible"[..]));
        assert!(fields.contains(&&b"Hrevalidate"[..]));
        assert_eq!(*b.last().unwrap(), 0);
    }
}
