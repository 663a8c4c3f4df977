//! HTTP handlers on reqwest (rustls, HTTP/2 where the server offers it through ALPN, a
//! keep-alive connection pool): POST the event JSON to an `http://` or `https://` URL.
//!
//! The allow list is enforced where the connection is made: reqwest resolves names through
//! `CheckedResolver`, which resolves, checks the answer with `AllowList::check` and hands
//! back only the checked addresses, so the connection goes to an address that was checked and
//! no second lookup can be rebound. The resolver is told only the name, so there is one
//! client (one pool) per target port, each with a resolver that knows its port. IP-literal
//! URLs never reach a resolver; they are checked before the request is sent. Redirects are
//! never followed, and no proxy is used: either would reach an address nobody checked.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use rustls::pki_types::CertificateDer;
use uuid::Uuid;

use super::{excerpt, result_from_output, signing, Failure, HandlerResult};
use crate::allow::{AllowList, Host};

/// How much of a non-2xx body goes into the error text.
const ERROR_BODY_BYTES: usize = 512;
/// How long a handler's signing secrets are reused before they are read again: a new or
/// rotated secret is used within this time.
const SECRETS_TTL: Duration = Duration::from_secs(5);
/// Idle pooled connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most handler URLs kept parsed (`HttpClient::target`); past that the cache starts afresh, so
/// a database of many handlers cannot grow it without bound.
const MAX_TARGETS: usize = 1024;

/// Why a target was refused before any connection, as the resolver reports it.
#[derive(Debug)]
enum Refusal {
    NotAllowed(String),
    Unresolvable(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotAllowed(reason) => write!(f, "http target not allowed: {reason}"),
            Refusal::Unresolvable(reason) => {
                write!(f, "http target could not be resolved: {reason}")
            }
        }
    }
}

impl std::error::Error for Refusal {}

/// Resolves a name for one port and lets through only the addresses the allow list accepts.
struct CheckedResolver {
    allow: Arc<AllowList>,
    port: u16,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = Arc::clone(&self.allow);
        let port = self.port;
        Box::pin(async move {
            let name = name.as_str().to_owned();
            let host = Host::parse(&name).map_err(Refusal::NotAllowed)?;
            if !allow.lists(&host, port) {
                return Err(
                    Refusal::NotAllowed(format!("{host}:{port} is not in --http-allow")).into(),
                );
            }
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), port))
                .await
                .map_err(|e| Refusal::Unresolvable(format!("{name}: {e}")))?
                .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
                .collect();
            allow
                .check(&host, port, &addrs)
                .map_err(Refusal::NotAllowed)?;
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// A handler's URL as deliveries use it: parsed, its IP literal (if any) checked against the
/// allow list, and the client (pool) of its port. Made once per URL, not once per delivery:
/// parsing a URL was a tenth of a busy supervisor's time.
struct Target {
    url: Url,
    client: reqwest::Client,
}

/// A handler, as its signing secrets are kept: (app id, script id).
pub type HandlerKey = (Uuid, Uuid);

/// Each handler's signing secrets and when they were read.
type SecretCache = HashMap<HandlerKey, (Instant, Arc<Vec<String>>)>;

/// The http clients and what every delivery needs: the allow list, the TLS roots, the reply
/// limit, and the signing secrets read recently.
pub struct HttpClient {
    allow: Arc<AllowList>,
    tls: rustls::ClientConfig,
    max_body: usize,
    clients: Mutex<HashMap<u16, reqwest::Client>>,
    targets: Mutex<HashMap<String, Arc<Target>>>,
    secrets: Mutex<SecretCache>,
    /// Held while secrets are read: deliveries that miss the cache together (a lane's first
    /// batch) read them once, on one connection, instead of one read and connection each.
    reading_secrets: tokio::sync::Mutex<()>,
}

impl HttpClient {
    /// `extra_roots` (--http-ca-file) are trusted besides the system's roots.
    pub fn new(
        allow: AllowList,
        extra_roots: &[CertificateDer<'static>],
        max_body: usize,
    ) -> Result<HttpClient, String> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        for cert in extra_roots {
            roots
                .add(cert.clone())
                .map_err(|e| format!("invalid --http-ca-file: {e}"))?;
        }
        let provider = crate::tls::crypto_provider();
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup failed: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(HttpClient {
            allow: Arc::new(allow),
            tls,
            max_body,
            clients: Mutex::new(HashMap::new()),
            targets: Mutex::new(HashMap::new()),
            secrets: Mutex::new(HashMap::new()),
            reading_secrets: tokio::sync::Mutex::new(()),
        })
    }

    /// The client for targets on `port`, built on first use.
    fn client(&self, port: u16) -> Result<reqwest::Client, String> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = clients.get(&port) {
            return Ok(client.clone());
        }
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(self.tls.clone())
            .dns_resolver(Arc::new(CheckedResolver {
                allow: Arc::clone(&self.allow),
                port,
            }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .user_agent(concat!("picloud-supervisor/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("http client could not be built: {e}"))?;
        clients.insert(port, client.clone());
        Ok(client)
    }

    /// `url` parsed and checked, from the cache when an earlier delivery made it. A URL that
    /// is refused is not kept: the refusal is worked out again, as it was before the cache.
    fn target(&self, url: &str) -> Result<Arc<Target>, String> {
        let cached = self.targets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(target) = cached.get(url) {
            return Ok(Arc::clone(target));
        }
        drop(cached);
        let parsed = Url::parse(url).map_err(|e| format!("http target invalid: {e}"))?;
        let (host, port) = target(&parsed).map_err(|e| format!("http target invalid: {e}"))?;
        if let Host::Ip(ip) = host {
            // No resolver sees an IP literal: check it here. (The allow list never changes
            // while the supervisor runs, so the check holds for every later delivery.)
            self.allow
                .check(&host, port, &[SocketAddr::new(ip, port)])
                .map_err(|e| format!("http target not allowed: {e}"))?;
        }
        let made = Arc::new(Target {
            url: parsed,
            client: self.client(port)?,
        });
        let mut cached = self.targets.lock().unwrap_or_else(PoisonError::into_inner);
        if cached.len() >= MAX_TARGETS {
            cached.clear();
        }
        cached.insert(url.to_owned(), Arc::clone(&made));
        Ok(made)
    }

    /// The handler's valid signing secrets (newest first): from the cache while they were read
    /// less than `SECRETS_TTL` ago, else from `read`. Deliveries that miss the cache together
    /// wait for one read (`reading_secrets`).
    pub async fn secrets<F, Fut>(
        &self,
        handler: HandlerKey,
        read: F,
    ) -> Result<Arc<Vec<String>>, Failure>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<String>, Failure>>,
    {
        if let Some(secrets) = self.cached_secrets(handler) {
            return Ok(secrets);
        }
        let _turn = self.reading_secrets.lock().await;
        // Another delivery may have read them while this one waited.
        if let Some(secrets) = self.cached_secrets(handler) {
            return Ok(secrets);
        }
        let secrets = Arc::new(read().await?);
        self.secrets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(handler, (Instant::now(), Arc::clone(&secrets)));
        Ok(secrets)
    }

    fn cached_secrets(&self, handler: HandlerKey) -> Option<Arc<Vec<String>>> {
        let secrets = self.secrets.lock().unwrap_or_else(PoisonError::into_inner);
        match secrets.get(&handler) {
            Some((read_at, secrets)) if read_at.elapsed() < SECRETS_TTL => {
                Some(Arc::clone(secrets))
            }
            _ => None,
        }
    }

    /// Posts `body` (the event JSON) to `url`; the whole exchange is bounded by `timeout`.
    pub async fn post(
        &self,
        url: &str,
        event_id: Uuid,
        body: Vec<u8>,
        secrets: &[String],
        timeout: Duration,
    ) -> HandlerResult {
        match tokio::time::timeout(timeout, self.exchange(url, event_id, body, secrets)).await {
            Ok(result) => result,
            Err(_) => Err(format!("http timeout after {} ms", timeout.as_millis()).into()),
        }
    }

    async fn exchange(
        &self,
        url: &str,
        event_id: Uuid,
        body: Vec<u8>,
        secrets: &[String],
    ) -> HandlerResult {
        let target = self.target(url)?;
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let id = event_id.to_string();
        let timestamp = Utc::now().timestamp();
        let mut put = |name: &'static str, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        };
        put("picloud-event-id", &id);
        if let Some(signature) = signing::signature(secrets, &id, timestamp, &body) {
            put("webhook-id", &id);
            put("webhook-timestamp", &timestamp.to_string());
            put("webhook-signature", &signature);
        }
        let mut response = target
            .client
            .post(target.url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| request_error(&target.url, &e))?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(LOCATION)
                .map_or("(none)".into(), |l| String::from_utf8_lossy(l.as_bytes()));
            return Err(format!(
                "http {}: redirect to {location} not followed",
                status.as_u16()
            )
            .into());
        }
        if !status.is_success() {
            let retry_at = retry_at(status, response.headers(), Utc::now());
            let (bytes, _) = read_capped(&mut response, ERROR_BODY_BYTES).await;
            return Err(Failure {
                error: format!(
                    "http {}: {}",
                    status.as_u16(),
                    excerpt(&bytes, ERROR_BODY_BYTES)
                ),
                retry_at,
            });
        }
        let (bytes, complete) = read_capped(&mut response, self.max_body).await;
        if !complete {
            return Err(format!("http response body larger than {} bytes", self.max_body).into());
        }
        Ok(result_from_output(&bytes))
    }
}

/// The URL's host and port; only http and https, without credentials.
fn target(url: &Url) -> Result<(Host, u16), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("unsupported scheme '{}'", url.scheme()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in the URL are not supported".to_owned());
    }
    let host = url.host_str().ok_or("no host")?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = url.port_or_known_default().ok_or("no port")?;
    Ok((Host::parse(host)?, port))
}

/// The body's first `max` bytes, and whether that was all of it. Reading stops at the limit.
async fn read_capped(response: &mut reqwest::Response, max: usize) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > max {
                    let room = max - body.len();
                    body.extend_from_slice(&chunk[..room]);
                    return (body, false);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return (body, true),
            // A body cut short: what arrived is all there is.
            Err(_) => return (body, false),
        }
    }
}

/// The refusal if the resolver refused the target, else the request's error and its causes.
fn request_error(url: &Url, error: &reqwest::Error) -> String {
    let mut text = format!(
        "http request to {} failed: {error}",
        url.host_str().unwrap_or("?")
    );
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(refusal) = cause.downcast_ref::<Refusal>() {
            return refusal.to_string();
        }
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// For 429 and 503: the time `Retry-After` asks for (delay-seconds or an HTTP date), if any.
fn retry_at(status: StatusCode, headers: &HeaderMap, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::SERVICE_UNAVAILABLE {
        return None;
    }
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u32>() {
        return Some(now + chrono::Duration::seconds(i64::from(seconds)));
    }
    DateTime::parse_from_rfc2822(value)
        .ok()
        .map(|at| at.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::test_support::block_on;

    fn headers(retry_after: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(retry_after) {
            headers.insert(RETRY_AFTER, value);
        }
        headers
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = Utc::now();
        let busy = StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(
            retry_at(busy, &headers("120"), now),
            Some(now + chrono::Duration::seconds(120))
        );
        let date = retry_at(
            StatusCode::TOO_MANY_REQUESTS,
            &headers("Wed, 21 Oct 2015 07:28:00 GMT"),
            now,
        );
        assert_eq!(date.map(|d| d.timestamp()), Some(1445412480));
        assert_eq!(retry_at(busy, &headers("soon"), now), None);
        assert_eq!(
            retry_at(StatusCode::INTERNAL_SERVER_ERROR, &headers("120"), now),
            None
        );
    }

    #[test]
    fn targets() {
        let parse = |url: &str| {
            Url::parse(url)
                .map_err(|e| e.to_string())
                .and_then(|u| target(&u))
        };
        assert_eq!(
            parse("https://Example.com/x"),
            Ok((Host::Name("example.com".into()), 443))
        );
        assert_eq!(
            parse("http://[::1]:9000/"),
            Ok((
                Host::Ip(
                    "::1"
                        .parse()
                        .unwrap_or(std::net::Ipv6Addr::UNSPECIFIED.into())
                ),
                9000
            ))
        );
        assert!(parse("ftp://example.com/").is_err());
        assert!(parse("http://user:pw@example.com/").is_err());
    }

    fn client(allow: &[&str]) -> HttpClient {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        let allow = AllowList::parse(&allow).unwrap_or_else(|e| panic!("{e}"));
        HttpClient::new(allow, &[], 1024).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn refused_targets_are_never_contacted() {
        let empty = client(&[]);
        for url in [
            "http://127.0.0.1:9/",
            "https://127.0.0.1:9/",
            "http://localhost:9/",
        ] {
            let refused = block_on(empty.post(
                url,
                Uuid::nil(),
                b"{}".to_vec(),
                &[],
                Duration::from_secs(5),
            ));
            assert!(
                refused
                    .as_ref()
                    .is_err_and(|f| f.error.starts_with("http target not allowed: ")),
                "{url}: {refused:?}"
            );
        }
        // The name is listed, but it resolves to loopback, which is not.
        let named = client(&["localhost:9"]);
        let refused = block_on(named.post(
            "http://localhost:9/",
            Uuid::nil(),
            b"{}".to_vec(),
            &[],
            Duration::from_secs(5),
        ));
        assert!(refused.is_err_and(|f| f.error.contains("loopback")));
        let invalid = block_on(named.post(
            "ftp://localhost:9/",
            Uuid::nil(),
            b"{}".to_vec(),
            &[],
            Duration::from_secs(5),
        ));
        assert!(invalid.is_err_and(|f| f.error.starts_with("http target invalid")));
    }

    /// A URL is parsed once and reused; a refused one is never kept, so it is refused on every
    /// delivery; and the cache cannot grow past `MAX_TARGETS`.
    #[test]
    fn targets_are_kept_once_made_and_refusals_never() {
        let http = client(&["127.0.0.1:9"]);
        let first = http
            .target("http://127.0.0.1:9/a")
            .map_err(|e| e.to_string());
        let again = http
            .target("http://127.0.0.1:9/a")
            .map_err(|e| e.to_string());
        assert!(matches!((&first, &again), (Ok(a), Ok(b)) if Arc::ptr_eq(a, b)));
        for _ in 0..2 {
            let refused = http.target("http://127.0.0.1:10/a").map(|_| ());
            assert!(refused.is_err_and(|e| e.starts_with("http target not allowed: ")));
        }
        let kept = |http: &HttpClient| http.targets.lock().map_or(0, |t| t.len());
        assert_eq!(kept(&http), 1);
        for n in 0..MAX_TARGETS + 5 {
            assert!(http.target(&format!("http://127.0.0.1:9/{n}")).is_ok());
        }
        assert!(kept(&http) <= MAX_TARGETS);
    }
}
