//! A throwaway certificate authority for TLS listeners under test.
//!
//! One CA and a server certificate for `localhost` and `127.0.0.1` signed by it, written as PEM
//! files into a temp dir so berth's config can point at them and clients can trust the CA.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use tempfile::TempDir;

/// A test CA with one current server certificate; files live as long as the value.
pub struct TestCa {
    dir: TempDir,
    ca_cert: Certificate,
    ca_key: KeyPair,
    ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
}

// === impl TestCa ===

impl TestCa {
    /// Creates the CA and a first server certificate, and writes `ca.pem`, `server.crt` and
    /// `server.key`.
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "berth test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = params.self_signed(&ca_key).expect("self-sign CA");
        let ca_pem = ca_cert.pem();
        let dir = tempfile::Builder::new()
            .prefix("berth-tls-")
            .tempdir()
            .expect("create TLS temp dir");
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).expect("write ca.pem");
        let mut ca = TestCa {
            dir,
            ca_cert,
            ca_key,
            ca_pem,
            server_cert_pem: String::new(),
            server_key_pem: String::new(),
        };
        ca.rotate_server_cert();
        ca
    }

    /// Issues a fresh server certificate (new key, new serial) and replaces `server.crt` and
    /// `server.key`, each by an atomic rename, to test certificate reloading.
    pub fn rotate_server_cert(&mut self) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("sign server cert");
        self.server_cert_pem = cert.pem();
        self.server_key_pem = key.serialize_pem();
        // Write the key first: a reloader that sees the new cert must also find its key.
        replace_file(&self.server_key_path(), &self.server_key_pem);
        replace_file(&self.server_cert_path(), &self.server_cert_pem);
    }

    /// The temp dir holding the PEM files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the CA certificate (`ca.pem`), for clients and `ca_file` settings.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Path of the server certificate (`server.crt`), for `[server.tls] cert`.
    pub fn server_cert_path(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    /// Path of the server key (`server.key`, PKCS#8), for `[server.tls] key`.
    pub fn server_key_path(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// The CA certificate as PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The current server certificate as PEM.
    pub fn server_cert_pem(&self) -> &str {
        &self.server_cert_pem
    }

    /// The current server key as PEM.
    pub fn server_key_pem(&self) -> &str {
        &self.server_key_pem
    }

    /// A reqwest client that trusts only this CA (plus nothing else), for HTTPS to berth.
    pub fn client(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).expect("parse CA PEM");
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .build()
            .expect("build TLS client")
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes `contents` next to `path` and renames it over `path`, so readers never see a torn file.
fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write temp PEM");
    std::fs::rename(&tmp, path).expect("rename PEM into place");
}
