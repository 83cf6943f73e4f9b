//! TLS termination for the client listener: rustls with ALPN h2 and http/1.1.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// Why the certificate or key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// File unreadable.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No certificate or key in the PEM file.
    #[error("{0}")]
    Pem(String),
    /// rustls rejected the pair.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Loads the PEM certificate chain and key into an acceptor offering h2 and http/1.1.
pub fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let certs = rustls_pemfile::certs(&mut read(&cfg.cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(format!("{}: {e}", cfg.cert.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Pem(format!(
            "{}: no certificates",
            cfg.cert.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut read(&cfg.key)?.as_slice())
        .map_err(|e| TlsError::Pem(format!("{}: {e}", cfg.key.display())))?
        .ok_or_else(|| TlsError::Pem(format!("{}: no private key", cfg.key.display())))?;
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}
