//! Real object stores for the shared-tier tests, started as child processes on loopback:
//! Azurite (Microsoft's Azure Storage emulator, npm `azurite`, its `azurite-blob` server) and
//! moto's S3 server (PyPI `moto[server]`). Both are installed by `.ci/install-deps`.
//!
//! Each [`ObjectStoreServer`] gives berth what it needs the way a deployment would (a bucket or
//! container URL and the environment the `object_store` crate reads credentials from), and gives
//! the test its own client to look at, damage or replace objects behind berth's back. A server
//! can be stopped and restarted on the same port (Azurite keeps its data across a restart; moto
//! keeps none, so its bucket is made again).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tempfile::TempDir;

use super::{free_port, require_binary};

/// The bucket / container every test store holds.
pub const BUCKET: &str = "berth";
/// Azurite's fixed development account.
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's published development key (not a secret: it is in Microsoft's documentation).
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// How long a starting server may take to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Which emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Azure Blob storage (Azurite).
    Azurite,
    /// S3 (moto server).
    Moto,
}

/// A running object-store emulator; killed on drop.
pub struct ObjectStoreServer {
    kind: Kind,
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    starts: usize,
}

impl ObjectStoreServer {
    /// Starts `kind` on a free port with an empty bucket named [`BUCKET`].
    pub async fn start(kind: Kind) -> ObjectStoreServer {
        let mut dir = tempfile::Builder::new()
            .prefix("berth-objstore-")
            .tempdir()
            .expect("temp dir");
        let mut last = String::new();
        for _ in 0..4 {
            let mut s = ObjectStoreServer {
                kind,
                child: None,
                port: free_port(),
                dir,
                starts: 0,
            };
            match s.spawn().await {
                Ok(()) => {
                    s.make_bucket().await;
                    return s;
                }
                Err(e) => {
                    last = e;
                    dir = s.take_dir();
                }
            }
        }
        panic!("{kind:?} did not start: {last}");
    }

    fn take_dir(mut self) -> TempDir {
        self.kill();
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"))
    }

    /// The `[cache.shared] url` naming the bucket.
    pub fn url(&self) -> String {
        match self.kind {
            Kind::Azurite => format!("az://{BUCKET}"),
            Kind::Moto => format!("s3://{BUCKET}"),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment berth reads the store's endpoint and credentials from, as it would in a
    /// deployment (never the config file).
    pub fn env(&self) -> Vec<(String, String)> {
        let pairs: Vec<(&str, String)> = match self.kind {
            Kind::Azurite => vec![
                ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
                ("AZURITE_BLOB_STORAGE_URL", self.endpoint()),
            ],
            Kind::Moto => vec![
                ("AWS_ACCESS_KEY_ID", "berth-test".into()),
                ("AWS_SECRET_ACCESS_KEY", "berth-test".into()),
                ("AWS_REGION", "us-east-1".into()),
                ("AWS_ENDPOINT", self.endpoint()),
                ("AWS_ALLOW_HTTP", "true".into()),
            ],
        };
        pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    /// A client of the store for the test itself (same bucket, same credentials).
    pub fn client(&self) -> Arc<dyn ObjectStore> {
        let connector = berth::shared::Connector {
            timeout: Duration::from_secs(10),
        };
        match self.kind {
            Kind::Azurite => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::new()
                    .with_account(AZURITE_ACCOUNT)
                    .with_access_key(AZURITE_KEY)
                    .with_endpoint(format!("{}/{AZURITE_ACCOUNT}", self.endpoint()))
                    .with_allow_http(true)
                    .with_container_name(BUCKET)
                    .with_http_connector(connector)
                    .build()
                    .expect("azurite client"),
            ),
            Kind::Moto => Arc::new(
                object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(BUCKET)
                    .with_region("us-east-1")
                    .with_access_key_id("berth-test")
                    .with_secret_access_key("berth-test")
                    .with_endpoint(self.endpoint())
                    .with_allow_http(true)
                    .with_http_connector(connector)
                    .build()
                    .expect("moto client"),
            ),
        }
    }

    /// Every object's key and size.
    pub async fn list(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .client()
            .list(None)
            .map_ok(|m| (m.location.to_string(), m.size))
            .try_collect()
            .await
            .expect("list objects");
        out.sort();
        out
    }

    /// The object at `key`, `None` when absent.
    pub async fn get(&self, key: &str) -> Option<Bytes> {
        match self.client().get(&StorePath::from(key)).await {
            Ok(r) => Some(r.bytes().await.expect("object body")),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("get {key}: {e}"),
        }
    }

    /// Writes `bytes` at `key` (to damage an object behind berth's back).
    pub async fn put(&self, key: &str, bytes: Vec<u8>) {
        self.client()
            .put(&StorePath::from(key), PutPayload::from(bytes))
            .await
            .expect("put object");
    }

    /// Stops the server with SIGTERM, as an orderly outage would (Azurite saves its metadata),
    /// and waits for it to exit: the store is down, its port refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port (and, for Azurite, the same data).
    pub async fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn().await {
                Ok(()) => break,
                // The old socket may linger a moment; retry on the same port only.
                Err(e) if Instant::now() < deadline && e.contains("in use") => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("{:?} did not restart: {e}", self.kind),
            }
        }
        if self.kind == Kind::Moto {
            self.make_bucket().await;
        }
    }

    /// What the server logged, for failure messages.
    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|n| std::fs::read_to_string(self.log_path(n)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n--- restart ---\n")
    }

    fn log_path(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("server-{n}.log"))
    }

    async fn spawn(&mut self) -> Result<(), String> {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts)).expect("log file");
        let port = self.port.to_string();
        let mut cmd = match self.kind {
            Kind::Azurite => {
                let data = self.dir.path().join("data");
                std::fs::create_dir_all(&data).expect("data dir");
                let mut c = Command::new(require_binary("azurite-blob"));
                c.args(["--blobHost", "127.0.0.1", "--blobPort", &port])
                    .arg("--location")
                    .arg(&data)
                    .args(["--skipApiVersionCheck", "--disableProductStyleUrl"]);
                c
            }
            Kind::Moto => {
                let mut c = Command::new(require_binary("moto_server"));
                c.args(["-H", "127.0.0.1", "-p", &port]);
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                let log = self.log();
                let in_use = log.contains("EADDRINUSE") || log.contains("in use");
                return Err(format!(
                    "exited with {status}{}: {log}",
                    if in_use { " (address in use)" } else { "" }
                ));
            }
            // Any HTTP answer means the server is up (Azurite answers an unsigned request with
            // an error status; moto answers 200).
            if client.get(format!("http://{addr}/")).send().await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no answer within {READY_TIMEOUT:?}: {}",
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn make_bucket(&self) {
        let client = reqwest::Client::new();
        let response = match self.kind {
            Kind::Moto => client
                .put(format!("{}/{BUCKET}", self.endpoint()))
                .send()
                .await
                .expect("create bucket"),
            Kind::Azurite => {
                let url = format!(
                    "{}/{AZURITE_ACCOUNT}/{BUCKET}?restype=container",
                    self.endpoint()
                );
                let headers = azure_shared_key(
                    "PUT",
                    &format!("/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{BUCKET}\nrestype:container"),
                );
                let mut req = client.put(url).header("content-length", "0");
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                req.send().await.expect("create container")
            }
        };
        assert!(
            response.status().is_success(),
            "{:?}: creating the bucket answered {}: {}",
            self.kind,
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ObjectStoreServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `x-ms-*` and `Authorization` headers of a body-less Azure Blob request signed with the
/// emulator's shared key (the `object_store` crate signs data requests itself but has no
/// "create container").
fn azure_shared_key(verb: &str, canonical_resource: &str) -> Vec<(&'static str, String)> {
    use base64::Engine;
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let version = "2021-08-06";
    // VERB, then eleven standard headers (all empty here), then the canonical x-ms headers and
    // the resource.
    let to_sign = format!(
        "{verb}\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n{canonical_resource}"
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &b64.decode(AZURITE_KEY).expect("emulator key"),
    );
    let signature = b64.encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref());
    vec![
        ("x-ms-date", date),
        ("x-ms-version", version.to_owned()),
        (
            "authorization",
            format!("SharedKey {AZURITE_ACCOUNT}:{signature}"),
        ),
    ]
}
