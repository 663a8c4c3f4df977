//! The no-op HTTP(S) server and the plain-client baseline of P1-http.

use crate::config::{err, Res};
use rustls::pki_types::pem::PemObject;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use uuid::Uuid;

/// A keep-alive no-op server on hyper (HTTP/1.1, and HTTP/2 where TLS negotiates it): every
/// request is answered 200 with an empty body once its body is read. It listens twice: plain
/// on `port`, TLS on `tls_port` with a certificate for 127.0.0.1 from a CA made here
/// (`ca_file`, for --http-ca-file).
pub struct NoopServer {
    pub port: u16,
    pub tls_port: u16,
    pub hits: Arc<AtomicU64>,
    pub ca_file: PathBuf,
    pub runtime: tokio::runtime::Runtime,
}

pub fn start_http_server(out: &Path) -> Res<NoopServer> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(err("server runtime"))?;
    let hits = Arc::new(AtomicU64::new(0));
    let ca = picloud_tests::TestCa::new("picloud bench CA");
    let ca_file = out.join("bench-ca.pem");
    std::fs::write(&ca_file, ca.pem()).map_err(err("write bench CA"))?;
    let (cert, key) = ca.server_cert(&["127.0.0.1"]);
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(err("server certificate"))?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(err("server key"))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        #[allow(deprecated)]
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(err("tls versions"))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(err("server TLS"))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let (plain, secure) = runtime
        .block_on(async {
            Ok::<_, std::io::Error>((
                tokio::net::TcpListener::bind("127.0.0.1:0").await?,
                tokio::net::TcpListener::bind("127.0.0.1:0").await?,
            ))
        })
        .map_err(err("bind the no-op server"))?;
    let port = plain.local_addr().map_err(err("address"))?.port();
    let tls_port = secure.local_addr().map_err(err("address"))?.port();
    let service = {
        let hits = Arc::clone(&hits);
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let hits = Arc::clone(&hits);
            async move {
                use http_body_util::BodyExt;
                let read = request.into_body().collect().await.is_ok();
                if read {
                    hits.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    hyper::body::Bytes::new(),
                )))
            }
        })
    };
    let served = service.clone();
    runtime.spawn(async move {
        while let Ok((stream, _)) = plain.accept().await {
            let _ = stream.set_nodelay(true);
            let service = served.clone();
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    runtime.spawn(async move {
        while let Ok((stream, _)) = secure.accept().await {
            let _ = stream.set_nodelay(true);
            let (service, acceptor) = (service.clone(), acceptor.clone());
            tokio::spawn(async move {
                if let Ok(stream) = acceptor.accept(stream).await {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            });
        }
    });
    Ok(NoopServer {
        port,
        tls_port,
        hits,
        ca_file,
        runtime,
    })
}

/// The baseline of P1-http: a plain reqwest client (one keep-alive pool) POSTing `n` event
/// documents of the supervisor's shape to the same server, `concurrency` at a time. Events/s.
pub fn plain_client_posts(server: &NoopServer, n: u64, concurrency: usize) -> Res<f64> {
    let url = format!("http://127.0.0.1:{}/hook", server.port);
    server.runtime.block_on(async move {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .map_err(err("reqwest client"))?;
        let next = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let (client, next, url) = (client.clone(), Arc::clone(&next), url.clone());
                tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        let id = Uuid::new_v4();
                        let body =
                            json!({"event_id": id.to_string(), "app_id": Uuid::nil().to_string(),
                            "source": "queue", "op": "bench", "payload": {"i": 1}, "depth": 0,
                            "attempt": 1, "trigger_id": null, "script_id": Uuid::nil().to_string()})
                            .to_string();
                        let response = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .header("picloud-event-id", id.to_string())
                            .body(body)
                            .send()
                            .await
                            .map_err(|e| e.to_string())?;
                        response.bytes().await.map_err(|e| e.to_string())?;
                    }
                    Ok::<(), String>(())
                })
            })
            .collect();
        for task in tasks {
            task.await.map_err(err("client task"))??;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })
}
