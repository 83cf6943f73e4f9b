//! TLS termination for the client listener: rustls with ALPN h2 and http/1.1, and the serving
//! certificate reloaded when its files change.
//!
//! cert-manager, the kubelet (Secret volumes swap a symlink) and certbot replace the certificate
//! and key files in place. Every handshake compares the files' identity (device, inode, size,
//! modification time: two `stat` calls, microseconds against a handshake's milliseconds) with
//! the pair in use and loads the new pair when they differ. A new pair is used only once both
//! files parse and the key matches the certificate, so a rotation caught between the two writes
//! keeps serving the old pair and is retried on the next handshake. Established connections
//! keep the certificate they were accepted with.
//!
//! Architecture: docs/ARCHITECTURE.md, "Request path".

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
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

/// Loads the PEM certificate chain and key into an acceptor offering h2 and http/1.1; the pair
/// is reloaded when the files change (see the module docs).
pub fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = ReloadingCert::load(&cfg.cert, &cfg.key, provider.clone())?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// Identity of a file's current contents: device, inode, size, modification time (ns).
type FileStamp = (u64, u64, u64, i64, i64);

fn stamp(path: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// The serving certificate, reloaded from its files when they change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Current>,
}

/// The pair in use and the file identities it was loaded from.
#[derive(Debug)]
struct Current {
    stamps: (Option<FileStamp>, Option<FileStamp>),
    key: Arc<CertifiedKey>,
}

// === impl ReloadingCert ===

impl ReloadingCert {
    /// Loads the pair once; an unusable pair at start is an error (berth does not start).
    pub fn load(
        cert: &Path,
        key: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<ReloadingCert, TlsError> {
        let stamps = (stamp(cert), stamp(key));
        let certified = load_pair(cert, key, &provider)?;
        Ok(ReloadingCert {
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
            provider,
            current: RwLock::new(Current {
                stamps,
                key: Arc::new(certified),
            }),
        })
    }

    /// The pair to serve: the current one, reloaded first if the files changed since.
    fn refreshed(&self) -> Arc<CertifiedKey> {
        let now = (stamp(&self.cert_path), stamp(&self.key_path));
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if current.stamps == now {
                return current.key.clone();
            }
        }
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.stamps == now {
            // Another handshake reloaded it meanwhile.
            return current.key.clone();
        }
        match load_pair(&self.cert_path, &self.key_path, &self.provider) {
            Ok(certified) => {
                tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
                current.key = Arc::new(certified);
                current.stamps = now;
            }
            // Half-rotated (new cert, old key) or unreadable: keep serving the old pair, try
            // again on the next handshake.
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate changed but cannot be loaded; keeping the previous one")
            }
        }
        current.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.refreshed())
    }
}

/// Reads and checks a certificate chain and its key (the key must match the certificate).
fn load_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let certs = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Pem(format!(
            "{}: no certificates",
            cert.display()
        )));
    }
    let private = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .map_err(|e| TlsError::Pem(format!("{}: {e}", key.display())))?
        .ok_or_else(|| TlsError::Pem(format!("{}: no private key", key.display())))?;
    let certified = CertifiedKey::from_der(certs, private, provider)?;
    Ok(certified)
}
