//! The --metrics-listen endpoint: `GET /metrics` (Prometheus text format 0.0.4) and
//! `GET /health` (or `/healthz`).
//!
//! A deliberately small HTTP/1.1 server, so the supervisor needs no web framework: one
//! request per connection (`Connection: close`), request heads of at most
//! `MAX_REQUEST_BYTES` read within `READ_TIMEOUT`, at most `MAX_CONNECTIONS` connections
//! at once, each in its own task. Answers are built from atomics only, so neither a
//! scrape nor a slow client can hold up claiming.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::log;
use crate::metrics::Metrics;

/// Largest request head (request line and headers) read. A scrape sends a few hundred bytes.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client has to send its request head, and to take the answer.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at once, unanswered.
const MAX_CONNECTIONS: usize = 64;
/// Pause after a failed accept (out of file descriptors, say) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const JSON_CONTENT_TYPE: &str = "application/json";
const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// Binds the listening socket. Done before anything else starts, so that an address
/// that cannot be used stops the supervisor at once.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Serves until the task is aborted or the runtime shuts down.
/// `stale_after`: how long without a claim before /health reports unhealthy.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stale_after: Duration) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                log::warn(
                    "metrics endpoint could not accept a connection",
                    &[("error", e.to_string().into())],
                );
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            log::debug(
                "metrics endpoint busy; connection closed unanswered",
                &[("max_connections", MAX_CONNECTIONS.into())],
            );
            continue;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            handle(stream, &metrics, stale_after).await;
            drop(permit);
        });
    }
}

/// A response, before encoding.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: TEXT_CONTENT_TYPE,
            body: format!("{body}\n"),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            reason_phrase(self.status),
            self.content_type,
            self.body.len()
        );
        if self.status == 405 {
            head.push_str("Allow: GET\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

async fn handle(mut stream: TcpStream, metrics: &Metrics, stale_after: Duration) {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => Response::text(408, "request not received in time"),
        Ok(Err(ReadError::Closed)) => return,
        Ok(Err(ReadError::TooLarge)) => Response::text(431, "request head too large"),
        Ok(Ok(head)) => match parse_request_line(&head) {
            Ok(request) => route(&request, metrics, stale_after),
            Err(reason) => Response::text(400, reason),
        },
    };
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&response.encode()).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        // The client went away or stopped reading; there is nobody left to tell.
        log::debug("metrics endpoint could not send its answer", &[]);
    }
}

#[derive(Debug, PartialEq, Eq)]
enum ReadError {
    /// The client closed the connection (or it broke) before a whole request head.
    Closed,
    TooLarge,
}

/// Reads up to the blank line that ends the request head. A body, if any, is not read:
/// no endpoint takes one, and the connection closes after the answer.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, ReadError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| ReadError::Closed)?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&head) {
            head.truncate(end);
            return Ok(head);
        }
        if head.len() >= MAX_REQUEST_BYTES {
            return Err(ReadError::TooLarge);
        }
    }
}

/// Where the head ends: at the first empty line (CRLF CRLF, or bare LF LF from lenient
/// clients), if it lies within the size limit.
fn head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = bytes.windows(2).position(|w| w == b"\n\n");
    let end = match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    (end <= MAX_REQUEST_BYTES).then_some(end)
}

#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    /// The target's path, without the query string.
    path: String,
}

/// Parses `METHOD SP TARGET SP HTTP/1.x` and checks that the header lines look like
/// headers. Errors are the text of the 400 answer.
fn parse_request_line(head: &[u8]) -> Result<Request, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "request is not valid UTF-8")?;
    let mut lines = text.split('\n').map(|line| line.trim_end_matches('\r'));
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line");
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err("malformed method");
    }
    if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err("malformed request target");
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err("unsupported HTTP version");
    }
    if lines.any(|header| !header.contains(':')) {
        return Err("malformed header line");
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
    })
}

fn route(request: &Request, metrics: &Metrics, stale_after: Duration) -> Response {
    if request.method != "GET" {
        return Response::text(405, "only GET is supported");
    }
    match request.path.as_str() {
        "/metrics" => Response {
            status: 200,
            content_type: METRICS_CONTENT_TYPE,
            body: metrics.render(),
        },
        "/health" | "/healthz" => {
            let verdict = metrics.dispatcher.verdict(stale_after);
            Response {
                status: if verdict.is_healthy() { 200 } else { 503 },
                content_type: JSON_CONTENT_TYPE,
                body: verdict.body() + "\n",
            }
        }
        _ => Response {
            status: 404,
            content_type: JSON_CONTENT_TYPE,
            body: json!({"error": "not found", "endpoints": ["/metrics", "/health"]}).to_string()
                + "\n",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Request, &'static str> {
        parse_request_line(text.as_bytes())
    }

    fn request(method: &str, path: &str) -> Request {
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
        }
    }

    #[test]
    fn request_lines_are_parsed() {
        assert_eq!(
            parse("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*"),
            Ok(request("GET", "/metrics"))
        );
        assert_eq!(
            parse("GET /health?verbose=1 HTTP/1.0"),
            Ok(request("GET", "/health"))
        );
        assert_eq!(
            parse("POST /metrics HTTP/1.1"),
            Ok(request("POST", "/metrics"))
        );
        assert_eq!(parse("GET /x HTTP/1.1\nHost: y"), Ok(request("GET", "/x")));
    }

    #[test]
    fn bad_requests_are_refused() {
        for bad in [
            "",
            "GET",
            "GET /metrics",
            "GET /metrics HTTP/1.1 extra",
            "GET  /metrics HTTP/1.1",
            "get /metrics HTTP/1.1",
            "GET metrics HTTP/1.1",
            "GET http://host/metrics HTTP/1.1",
            "GET /metrics HTTP/2.0",
            "GET /metrics FTP/1.1",
            "GET /metrics HTTP/1.1\r\nno colon here",
            "\u{16}\u{3}\u{1} TLS hello",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_request_line(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn the_head_ends_at_the_first_empty_line_within_the_limit() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(20));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_REQUEST_BYTES));
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(head_end(&long), None);
    }

    #[test]
    fn routes() {
        let metrics = Metrics::new(2);
        let stale = Duration::from_secs(15);
        let scrape = route(&request("GET", "/metrics"), &metrics, stale);
        assert_eq!(scrape.status, 200);
        assert_eq!(scrape.content_type, METRICS_CONTENT_TYPE);
        assert!(scrape.body.contains("picloud_up 1\n"));
        // Not connected yet: unhealthy.
        let health = route(&request("GET", "/health"), &metrics, stale);
        assert_eq!(health.status, 503);
        assert!(health.body.contains("unreachable"));
        metrics.dispatcher.set_connected(true);
        metrics.dispatcher.claimed();
        for path in ["/health", "/healthz"] {
            let health = route(&request("GET", path), &metrics, stale);
            assert_eq!(health.status, 200, "{path}");
            assert!(health.body.contains("\"status\":\"ok\""));
        }
        assert_eq!(route(&request("GET", "/nope"), &metrics, stale).status, 404);
        assert_eq!(route(&request("GET", "/"), &metrics, stale).status, 404);
        assert_eq!(
            route(&request("POST", "/metrics"), &metrics, stale).status,
            405
        );
        assert_eq!(
            route(&request("HEAD", "/health"), &metrics, stale).status,
            405
        );
    }

    #[test]
    fn responses_are_encoded_with_length_and_close() {
        let encoded = Response::text(405, "only GET is supported").encode();
        let text = String::from_utf8(encoded).unwrap_or_default();
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(text.contains("\r\nContent-Length: 22\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert!(text.contains("\r\nAllow: GET\r\n"));
        assert!(text.ends_with("\r\n\r\nonly GET is supported\n"));
    }
}
