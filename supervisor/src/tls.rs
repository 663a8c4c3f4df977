//! TLS to Postgres with rustls, following libpq's `sslmode` and `sslrootcert`.
//!
//! tokio-postgres understands only `sslmode=disable|prefer|require`, so the two TLS keys are
//! taken out of the connection string here (URL query or key=value pairs) and everything else
//! is left to `tokio_postgres::Config`. The modes mean what they mean to libpq:
//! `disable` never encrypts; `prefer` (the default) and `require` encrypt without checking the
//! certificate (`prefer` falls back to plain text if the server has no TLS); `verify-ca` checks
//! the chain against the root certificates; `verify-full` checks the chain and that the
//! certificate names the host connected to.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<SslMode, String> {
        match text {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            // allow is libpq's "plain text first": no reason to ever want it here.
            other => Err(format!(
                "sslmode '{other}' is not supported (expected disable, prefer, require, verify-ca or verify-full)"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: whether to ask for TLS, and whether to insist.
    pub fn negotiation(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }
}

/// The TLS settings taken out of a connection string, and the string without them.
#[derive(Debug, PartialEq, Eq)]
pub struct Split {
    pub rest: String,
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
}

/// Takes `sslmode` and `sslrootcert` out of a `postgres://` URL or a key=value string.
pub fn split_connection_string(text: &str) -> Result<Split, String> {
    let trimmed = text.trim();
    let is_url = trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://");
    let (rest, pairs) = if is_url {
        split_url(trimmed)
    } else {
        split_key_values(trimmed)?
    };
    let mut mode = SslMode::Prefer;
    let mut root_cert = None;
    for (key, value) in pairs {
        match key.as_str() {
            "sslmode" => mode = SslMode::parse(&value)?,
            _ => root_cert = Some(PathBuf::from(value)),
        }
    }
    Ok(Split {
        rest,
        mode,
        root_cert,
    })
}

const TLS_KEYS: [&str; 2] = ["sslmode", "sslrootcert"];

/// The query's TLS keys are percent-decoded as libpq does ('+' stays '+'); the other
/// parameters are kept as written.
fn split_url(url: &str) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), Vec::new());
    };
    let (taken, kept): (Vec<&str>, Vec<&str>) = query
        .split('&')
        .filter(|part| !part.is_empty())
        .partition(|part| TLS_KEYS.contains(&part.split('=').next().unwrap_or_default()));
    let taken = taken
        .iter()
        .map(|part| {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
            (key.to_owned(), value.into_owned())
        })
        .collect();
    match kept.is_empty() {
        true => (base.to_owned(), taken),
        false => (format!("{base}?{}", kept.join("&")), taken),
    }
}

/// Splits libpq's `key = value` pairs (values optionally single-quoted, with backslash
/// escapes), keeping the other pairs' text as written.
fn split_key_values(text: &str) -> Result<(String, Vec<(String, String)>), String> {
    let chars: Vec<char> = text.chars().collect();
    let mut kept: Vec<String> = Vec::new();
    let mut taken = Vec::new();
    let mut i = 0;
    let skip_spaces = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_spaces(&mut i);
        if i >= chars.len() {
            break;
        }
        let start = i;
        while i < chars.len() && chars[i] != '=' && !chars[i].is_whitespace() {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        skip_spaces(&mut i);
        if chars.get(i) != Some(&'=') {
            return Err(format!(
                "missing '=' after '{key}' in the connection string"
            ));
        }
        i += 1;
        skip_spaces(&mut i);
        let mut value = String::new();
        if chars.get(i) == Some(&'\'') {
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err("unterminated quoted value in the connection string".into()),
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some('\\') => {
                        if let Some(c) = chars.get(i + 1) {
                            value.push(*c);
                        }
                        i += 2;
                    }
                    Some(c) => {
                        value.push(*c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < chars.len() && !chars[i].is_whitespace() {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                value.push(chars[i]);
                i += 1;
            }
        }
        if TLS_KEYS.contains(&key.as_str()) {
            taken.push((key, value));
        } else {
            kept.push(chars[start..i].iter().collect());
        }
    }
    Ok((kept.join(" "), taken))
}

/// The rustls configuration for `mode`. Root certificates come from `sslrootcert` (a PEM
/// file, or `system` for the operating system's store), else from libpq's default
/// `~/.postgresql/root.crt`; only the verify modes need them.
pub fn client_config(mode: SslMode, root_cert: Option<&Path>) -> Result<ClientConfig, String> {
    let provider = crypto_provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let chain = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => None,
        SslMode::VerifyCa | SslMode::VerifyFull => Some(
            WebPkiServerVerifier::builder_with_provider(
                Arc::new(load_roots(mode, root_cert)?),
                Arc::clone(&provider),
            )
            .build()
            .map_err(|e| format!("TLS setup failed: {e}"))?,
        ),
    };
    let verifier = Verifier {
        provider,
        chain,
        check_name: mode == SslMode::VerifyFull,
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// The cryptography under every TLS connection the supervisor makes. ring, because reqwest and
/// tokio-postgres-rustls use it already and it builds with a plain C compiler (aws-lc-rs needs
/// cmake); rustls 0.23.48 deprecates it only for lacking post-quantum key exchange.
#[allow(deprecated)]
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_roots(mode: SslMode, root_cert: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    if root_cert == Some(Path::new("system")) {
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
        return Ok(roots);
    }
    let path = match root_cert {
        Some(path) => path.to_owned(),
        None => std::env::var_os("HOME")
            .map(|home| Path::new(&home).join(".postgresql/root.crt"))
            .filter(|p| p.exists())
            .ok_or_else(|| {
                format!(
                    "sslmode={} needs root certificates: set sslrootcert to a PEM file (or to 'system')",
                    mode.as_str()
                )
            })?,
    };
    let certs = load_pem_certificates(&path)?;
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// Every certificate of a PEM file; an unreadable file, or one with none, is an error.
pub fn load_pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// Checks the server's certificate as the mode asks. Without a chain to check
/// (`prefer`/`require`) any certificate is accepted, as libpq does, but the handshake
/// signatures are still verified, so the session is encrypted to whoever holds the key of the
/// certificate presented; `verify-ca` checks the chain but not the name, `verify-full` both.
#[derive(Debug)]
struct Verifier {
    provider: Arc<rustls::crypto::CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Whether a connection failed because the server's certificate did not verify: a
/// configuration problem (wrong root, wrong host name), not an outage.
pub fn is_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(error) = current {
        if let Some(rustls::Error::InvalidCertificate(_)) = error.downcast_ref::<rustls::Error>() {
            return true;
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| {
                inner
                    .downcast_ref::<rustls::Error>()
                    .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)))
            }) {
                return true;
            }
        }
        current = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_tls_keys_are_taken_out() {
        let cases = [
            (
                "postgres://u:p@db:5432/app?sslmode=verify-full&connect_timeout=3&sslrootcert=%2Fetc%2Fca.pem",
                "postgres://u:p@db:5432/app?connect_timeout=3",
                SslMode::VerifyFull,
                Some("/etc/ca.pem"),
            ),
            ("postgresql://db/app?sslmode=require", "postgresql://db/app", SslMode::Require, None),
            ("postgres://db/app", "postgres://db/app", SslMode::Prefer, None),
            (
                "host=db user=u sslmode = verify-ca sslrootcert='/tmp/my ca.pem' password='a\\'b'",
                "host=db user=u password='a\\'b'",
                SslMode::VerifyCa,
                Some("/tmp/my ca.pem"),
            ),
        ];
        for (text, rest, mode, root) in cases {
            let split = split_connection_string(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(split.rest, rest);
            assert_eq!(split.mode, mode);
            assert_eq!(split.root_cert, root.map(PathBuf::from));
        }
        assert!(split_connection_string("host=db sslmode=allow").is_err());
        assert!(split_connection_string("host=db sslmode").is_err());
    }

    #[test]
    fn verify_modes_need_roots() {
        let missing = client_config(SslMode::VerifyFull, Some(Path::new("/nonexistent/ca.pem")));
        assert!(missing.is_err_and(|e| e.contains("/nonexistent/ca.pem")));
        assert!(client_config(SslMode::Require, None).is_ok());
        assert!(client_config(SslMode::VerifyCa, Some(Path::new("system"))).is_ok());
    }
}
