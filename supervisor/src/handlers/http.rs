//! HTTP handlers: POST the event to a plain http:// URL with a minimal
//! HTTP/1.1 client. One request per connection (`Connection: close`), so the
//! response ends at its declared length, at the end of its chunked body, or
//! when the server closes the connection.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

use super::{excerpt, result_from_output, HandlerResult};
use crate::allow::{split_host_port, AllowList, Host};

/// Largest response header accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Room for chunk-size lines on top of the body limit when reading chunked bodies.
const CHUNK_OVERHEAD_BYTES: usize = 64 * 1024;
/// How much of a non-2xx body goes into the error text.
const ERROR_BODY_BYTES: usize = 512;

#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub port: u16,
    /// Path and query, always starting with '/'.
    pub path: String,
    /// Value of the Host header.
    pub host_header: String,
}

/// Parses an http:// URL. https, credentials and non-ASCII paths are refused.
pub fn parse_url(url: &str) -> Result<Target, String> {
    let rest = match url.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("http://") => &url[7..],
        _ if url
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://")) =>
        {
            return Err("https is not supported (plain http:// only)".to_owned());
        }
        _ => return Err(format!("'{url}' is not an http:// URL")),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.contains('@') {
        return Err("credentials in the URL are not supported".to_owned());
    }
    let (host, port) = split_host_port(authority)?;
    let port = port.unwrap_or(80);
    let tail = tail.split('#').next().unwrap_or("");
    let path = match tail.chars().next() {
        None => "/".to_owned(),
        Some('?') => format!("/{tail}"),
        Some(_) => tail.to_owned(),
    };
    if path.bytes().any(|b| b <= b' ' || b >= 0x7f) {
        return Err("the URL path must be ASCII without spaces (percent-encode it)".to_owned());
    }
    let host_header = if port == 80 {
        host.to_string()
    } else {
        format!("{host}:{port}")
    };
    Ok(Target {
        host,
        port,
        path,
        host_header,
    })
}

/// Runs an http handler: the whole exchange, connect included, is bounded by `timeout`.
pub async fn run(
    allow: &AllowList,
    max_body: usize,
    url: &str,
    event_id: Uuid,
    body: &[u8],
    timeout: Duration,
) -> HandlerResult {
    match tokio::time::timeout(timeout, post(allow, max_body, url, event_id, body)).await {
        Ok(result) => result,
        Err(_) => Err(format!("http timeout after {} ms", timeout.as_millis())),
    }
}

async fn post(
    allow: &AllowList,
    max_body: usize,
    url: &str,
    event_id: Uuid,
    body: &[u8],
) -> HandlerResult {
    let target = parse_url(url).map_err(|e| format!("http target invalid: {e}"))?;
    let resolved = resolve(&target).await?;
    allow
        .check(&target.host, target.port, &resolved)
        .map_err(|e| format!("http target not allowed: {e}"))?;
    let mut stream = connect(&resolved).await?;

    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nPicloud-Event-Id: {event_id}\r\nConnection: close\r\nUser-Agent: picloud-supervisor/{version}\r\n\r\n",
        path = target.path,
        host = target.host_header,
        len = body.len(),
        version = env!("CARGO_PKG_VERSION"),
    );
    let io_error =
        |e: std::io::Error| format!("http request to {} failed: {e}", target.host_header);
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(io_error)?;
    stream.write_all(body).await.map_err(io_error)?;
    stream.flush().await.map_err(io_error)?;

    let response = read_response(&mut stream, max_body)
        .await
        .map_err(|e| format!("http response from {} unusable: {e}", target.host_header))?;
    interpret(response, max_body)
}

async fn resolve(target: &Target) -> Result<Vec<SocketAddr>, String> {
    match &target.host {
        Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, target.port)]),
        Host::Name(name) => match tokio::net::lookup_host((name.as_str(), target.port)).await {
            Ok(addrs) => Ok(addrs
                .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
                .collect()),
            Err(e) => Err(format!("http target could not be resolved: {name}: {e}")),
        },
    }
}

/// Connects to the first reachable address among those already checked.
async fn connect(addrs: &[SocketAddr]) -> Result<TcpStream, String> {
    let mut last_error = String::from("no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                // Small request, then wait for the answer: do not let Nagle delay it.
                if let Err(e) = stream.set_nodelay(true) {
                    last_error = e.to_string();
                    continue;
                }
                return Ok(stream);
            }
            Err(e) => last_error = format!("{}: {e}", display_addr(addr)),
        }
    }
    Err(format!("http connect failed: {last_error}"))
}

fn display_addr(addr: &SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
        IpAddr::V4(ip) => format!("{ip}:{}", addr.port()),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// False when the body was longer than allowed and reading stopped early.
    pub complete: bool,
}

fn interpret(response: Response, max_body: usize) -> HandlerResult {
    if !(200..300).contains(&response.status) {
        return Err(format!(
            "http {}: {}",
            response.status,
            excerpt(&response.body, ERROR_BODY_BYTES)
        ));
    }
    if !response.complete || response.body.len() > max_body {
        return Err(format!("http response body larger than {max_body} bytes"));
    }
    Ok(result_from_output(&response.body))
}

async fn read_response(stream: &mut TcpStream, max_body: usize) -> Result<Response, String> {
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut head: Option<Head> = None;
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        let eof = n == 0;
        buf.extend_from_slice(&chunk[..n]);
        if head.is_none() {
            head = parse_head(&buf)?;
        }
        let Some(h) = &head else {
            if eof {
                return Err("connection closed before a complete response header".to_owned());
            }
            continue;
        };
        let data = &buf[h.len..];
        if let Some(body) = body_if_complete(&h.framing, data, eof)? {
            return Ok(Response {
                status: h.status,
                body,
                complete: true,
            });
        }
        let limit = match h.framing {
            Framing::Chunked => max_body.saturating_add(CHUNK_OVERHEAD_BYTES),
            _ => max_body,
        };
        if data.len() > limit {
            return Ok(Response {
                status: h.status,
                body: data.to_vec(),
                complete: false,
            });
        }
    }
}

/// How the body of a response is delimited.
#[derive(Debug, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilEof,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// Bytes taken by the header (and any interim 1xx responses before it).
    pub len: usize,
    pub framing: Framing,
}

/// Parses the response header once it is complete (`Ok(None)` until then).
/// Interim 1xx responses are skipped.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut offset = 0;
    loop {
        let rest = &buf[offset..];
        let Some(end) = find(rest, b"\r\n\r\n") else {
            if rest.len() > MAX_HEAD_BYTES {
                return Err(format!(
                    "response header larger than {MAX_HEAD_BYTES} bytes"
                ));
            }
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&rest[..end]);
        let mut lines = text.split("\r\n");
        let status = parse_status_line(lines.next().unwrap_or(""))?;
        let mut content_length: Option<usize> = None;
        let mut chunked = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                return Err(format!(
                    "malformed header line '{}'",
                    excerpt(line.as_bytes(), 80)
                ));
            };
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("content-length") {
                let length: usize = value
                    .parse()
                    .map_err(|_| format!("invalid Content-Length '{value}'"))?;
                if content_length.is_some_and(|previous| previous != length) {
                    return Err("conflicting Content-Length headers".to_owned());
                }
                content_length = Some(length);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                // Chunked is always the last coding when present.
                chunked = value
                    .rsplit(',')
                    .next()
                    .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"));
            }
        }
        let len = offset + end + 4;
        if (100..200).contains(&status) && status != 101 {
            offset = len;
            continue;
        }
        let framing = if status == 204 || status == 304 || (100..200).contains(&status) {
            Framing::Empty
        } else if chunked {
            Framing::Chunked
        } else if let Some(length) = content_length {
            Framing::Length(length)
        } else {
            Framing::UntilEof
        };
        return Ok(Some(Head {
            status,
            len,
            framing,
        }));
    }
}

/// Parses `HTTP/1.x NNN [reason]` and returns the status code.
pub fn parse_status_line(line: &str) -> Result<u16, String> {
    let bad = || format!("malformed status line '{}'", excerpt(line.as_bytes(), 80));
    let (version, rest) = line.split_once(' ').ok_or_else(bad)?;
    if !version.starts_with("HTTP/1.") {
        return Err(bad());
    }
    let rest = rest.trim_start();
    let code = rest.get(..3).ok_or_else(bad)?;
    let followed_by_reason = rest.len() == 3 || rest[3..].starts_with(' ');
    if !code.bytes().all(|b| b.is_ascii_digit()) || !followed_by_reason {
        return Err(bad());
    }
    code.parse::<u16>().map_err(|_| bad())
}

/// Returns the body once all of it has arrived (`Ok(None)` until then).
pub fn body_if_complete(
    framing: &Framing,
    data: &[u8],
    eof: bool,
) -> Result<Option<Vec<u8>>, String> {
    match framing {
        Framing::Empty => Ok(Some(Vec::new())),
        Framing::Length(length) => {
            if data.len() >= *length {
                Ok(Some(data[..*length].to_vec()))
            } else if eof {
                Err(format!(
                    "connection closed after {} of {length} body bytes",
                    data.len()
                ))
            } else {
                Ok(None)
            }
        }
        Framing::Chunked => match decode_chunked(data)? {
            Some(body) => Ok(Some(body)),
            None if eof => Err("connection closed inside the chunked body".to_owned()),
            None => Ok(None),
        },
        Framing::UntilEof => Ok(eof.then(|| data.to_vec())),
    }
}

/// Decodes a complete chunked body (`Ok(None)` while incomplete). Chunk
/// extensions and trailers are accepted and ignored.
pub fn decode_chunked(data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(line_end) = find(&data[pos..], b"\r\n") else {
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&data[pos..pos + line_end]);
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("invalid chunk size '{}'", excerpt(size_text.as_bytes(), 20)))?;
        pos += line_end + 2;
        if size == 0 {
            // Trailers, each on its own line, end with an empty line.
            loop {
                let Some(end) = find(&data[pos..], b"\r\n") else {
                    return Ok(None);
                };
                if end == 0 {
                    return Ok(Some(body));
                }
                pos += end + 2;
            }
        }
        let data_end = pos
            .checked_add(size)
            .ok_or_else(|| "chunk size too large".to_owned())?;
        if data.len() < data_end.saturating_add(2) {
            return Ok(None);
        }
        body.extend_from_slice(&data[pos..data_end]);
        if &data[data_end..data_end + 2] != b"\r\n" {
            return Err("chunk not followed by CRLF".to_owned());
        }
        pos = data_end + 2;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Parses a whole response as the reader would see it; `eof` says whether the
/// connection is closed. Used by tests to check framing end to end.
#[cfg(test)]
fn parse_response(buf: &[u8], eof: bool) -> Result<Option<(u16, Vec<u8>)>, String> {
    let Some(head) = parse_head(buf)? else {
        return Ok(None);
    };
    Ok(body_if_complete(&head.framing, &buf[head.len..], eof)?.map(|body| (head.status, body)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn target(url: &str) -> Target {
        match parse_url(url) {
            Ok(t) => t,
            Err(e) => panic!("{url}: {e}"),
        }
    }

    #[test]
    fn parses_urls() {
        let t = target("http://Example.com/hook?x=1#frag");
        assert_eq!(t.host, Host::Name("example.com".into()));
        assert_eq!(t.port, 80);
        assert_eq!(t.path, "/hook?x=1");
        assert_eq!(t.host_header, "example.com");

        let t = target("HTTP://127.0.0.1:8080");
        assert_eq!(t.port, 8080);
        assert_eq!(t.path, "/");
        assert_eq!(t.host_header, "127.0.0.1:8080");

        let t = target("http://[::1]:9000?q");
        assert_eq!(t.path, "/?q");
        assert_eq!(t.host_header, "[::1]:9000");

        assert!(parse_url("https://example.com/").is_err_and(|e| e.contains("https")));
        assert!(parse_url("ftp://example.com/").is_err());
        assert!(parse_url("http://user:pw@example.com/").is_err());
        assert!(parse_url("http:///path").is_err());
        assert!(parse_url("http://example.com/a b").is_err());
        assert!(parse_url("http://example.com/a\r\nX: y").is_err());
        assert!(parse_url("http://example.com:99999/").is_err());
    }

    #[test]
    fn parses_status_lines() {
        assert_eq!(parse_status_line("HTTP/1.1 200 OK"), Ok(200));
        assert_eq!(parse_status_line("HTTP/1.0 404 Not Found"), Ok(404));
        assert_eq!(parse_status_line("HTTP/1.1 503"), Ok(503));
        assert!(parse_status_line("HTTP/2 200 OK").is_err());
        assert!(parse_status_line("HTTP/1.1 20 OK").is_err());
        assert!(parse_status_line("HTTP/1.1 2000 OK").is_err());
        assert!(parse_status_line("garbage").is_err());
        assert!(parse_status_line("").is_err());
    }

    #[test]
    fn content_length_framing() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}";
        assert_eq!(
            parse_response(raw, false),
            Ok(Some((200, b"{\"ok\":true}".to_vec())))
        );
        // Bytes beyond the declared length are ignored.
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA";
        assert_eq!(parse_response(raw, false), Ok(Some((200, b"ok".to_vec()))));
        // Incomplete until all bytes arrive; an early close is an error.
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc";
        assert_eq!(parse_response(raw, false), Ok(None));
        assert!(parse_response(raw, true).is_err());
        // Conflicting or invalid lengths are errors.
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            false
        )
        .is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false).is_err());
    }

    #[test]
    fn read_to_eof_framing() {
        let raw = b"HTTP/1.0 500 Internal Server Error\r\nServer: x\r\n\r\nsomething broke";
        assert_eq!(parse_response(raw, false), Ok(None));
        assert_eq!(
            parse_response(raw, true),
            Ok(Some((500, b"something broke".to_vec())))
        );
    }

    #[test]
    fn incomplete_header() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-", false),
            Ok(None)
        );
        let huge = vec![b'a'; MAX_HEAD_BYTES + 10];
        assert!(parse_head(&huge).is_err());
    }

    #[test]
    fn chunked_framing() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-Trailer: y\r\n\r\n";
        assert_eq!(
            parse_response(raw, false),
            Ok(Some((200, b"Wikipedia".to_vec())))
        );
        let partial = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWi";
        assert_eq!(parse_response(partial, false), Ok(None));
        assert!(parse_response(partial, true).is_err());
        assert!(decode_chunked(b"zz\r\n").is_err());
        assert!(decode_chunked(b"2\r\nabXX").is_err());
    }

    #[test]
    fn interim_and_bodyless_responses() {
        let raw =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(raw, false), Ok(Some((201, b"{}".to_vec()))));
        let raw = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(parse_response(raw, false), Ok(Some((204, Vec::new()))));
    }

    #[test]
    fn responses_become_results_or_errors() {
        let ok = |body: &[u8]| Response {
            status: 200,
            body: body.to_vec(),
            complete: true,
        };
        assert_eq!(interpret(ok(b"{\"a\":1}"), 100), Ok(Some(json!({"a": 1}))));
        assert_eq!(
            interpret(ok(b"plain text"), 100),
            Ok(Some(json!("plain text")))
        );
        assert_eq!(interpret(ok(b""), 100), Ok(None));
        assert!(interpret(ok(&[b'x'; 101]), 100).is_err());
        let too_long = Response {
            status: 200,
            body: b"x".to_vec(),
            complete: false,
        };
        assert!(interpret(too_long, 100).is_err_and(|e| e.contains("larger than 100")));

        let failed = Response {
            status: 503,
            body: vec![b'e'; 2000],
            complete: true,
        };
        let error = interpret(failed, 100).err().unwrap_or_default();
        assert!(error.starts_with("http 503: eee"));
        assert_eq!(error.len(), "http 503: ".len() + ERROR_BODY_BYTES);
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(future),
            Err(e) => panic!("runtime: {e}"),
        }
    }

    /// Serves one connection on 127.0.0.1: returns the request it read
    /// (until the body is complete) after writing `reply`.
    async fn serve_once(reply: &'static [u8]) -> (u16, tokio::task::JoinHandle<String>) {
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(listener) => listener,
            Err(e) => panic!("bind: {e}"),
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let server = tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else {
                return String::new();
            };
            let mut request = Vec::new();
            let mut chunk = [0u8; 4096];
            while !String::from_utf8_lossy(&request).ends_with("\"op\":\"insert\"}") {
                match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&chunk[..n]),
                }
            }
            if reply.is_empty() {
                // Never answer: the client must time out.
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            let _ = socket.write_all(reply).await; // test server: the client may be gone
            String::from_utf8_lossy(&request).into_owned()
        });
        (port, server)
    }

    const BODY: &[u8] = br#"{"op":"insert"}"#;

    #[test]
    fn posts_the_event_to_an_allowed_loopback_target() {
        let event_id = Uuid::nil();
        let (result, request) = block_on(async {
            let (port, server) =
                serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"done\":true}").await;
            let allow = match AllowList::parse(&["127.0.0.1".to_owned()]) {
                Ok(allow) => allow,
                Err(e) => panic!("{e}"),
            };
            let url = format!("http://127.0.0.1:{port}/hook");
            let result = run(&allow, 1024, &url, event_id, BODY, Duration::from_secs(5)).await;
            (result, server.await.unwrap_or_default())
        });
        assert_eq!(result, Ok(Some(json!({"done": true}))));
        assert!(request.starts_with("POST /hook HTTP/1.1\r\n"));
        assert!(request.contains("\r\nHost: 127.0.0.1:"));
        assert!(request.contains("\r\nContent-Type: application/json\r\n"));
        assert!(request.contains(&format!("\r\nPicloud-Event-Id: {event_id}\r\n")));
        assert!(request.contains("\r\nConnection: close\r\n"));
        assert!(request.ends_with("\r\n\r\n{\"op\":\"insert\"}"));
    }

    /// Posts BODY to a local server that answers `response` once, allowing 127.0.0.1.
    fn post_to_server_answering(response: &'static [u8], timeout: Duration) -> HandlerResult {
        let allow = match AllowList::parse(&["127.0.0.1".to_owned()]) {
            Ok(allow) => allow,
            Err(e) => panic!("{e}"),
        };
        block_on(async {
            let (port, _server) = serve_once(response).await;
            let url = format!("http://127.0.0.1:{port}/");
            run(&allow, 1024, &url, Uuid::nil(), BODY, timeout).await
        })
    }

    #[test]
    fn non_2xx_and_timeouts_are_failures() {
        let failed = post_to_server_answering(
            b"HTTP/1.1 418 Teapot\r\n\r\nno coffee",
            Duration::from_secs(5),
        );
        assert_eq!(failed, Err("http 418: no coffee".to_owned()));
        let timed_out = post_to_server_answering(b"", Duration::from_millis(200));
        assert_eq!(timed_out, Err("http timeout after 200 ms".to_owned()));
    }

    #[test]
    fn refused_targets_are_never_contacted() {
        let refused = block_on(run(
            &AllowList::default(),
            1024,
            "http://127.0.0.1:9/",
            Uuid::nil(),
            BODY,
            Duration::from_secs(5),
        ));
        assert!(refused.is_err_and(|e| e.starts_with("http target not allowed: ")));
        let https = block_on(run(
            &AllowList::default(),
            1024,
            "https://example.com/",
            Uuid::nil(),
            BODY,
            Duration::from_secs(5),
        ));
        assert!(https.is_err_and(|e| e.starts_with("http target invalid: https")));
    }
}
