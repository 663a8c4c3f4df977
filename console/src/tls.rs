//! https for the console itself (--console-tls-cert/--console-tls-key), with rustls.

use std::path::Path;
use std::sync::Arc;

use axum_server::tls_rustls::RustlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;

use crate::pg_tls;

pub fn server_config(cert: &Path, key: &Path) -> Result<RustlsConfig, String> {
    let chain =
        pg_tls::load_pem_certificates(cert).map_err(|e| format!("--console-tls-cert {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--console-tls-key {}: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(pg_tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("--console-tls-cert/--console-tls-key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(RustlsConfig::from_config(Arc::new(config)))
}
