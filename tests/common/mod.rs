//! Integration-test harness shared by the files in `tests/`.
//!
//! Real servers only: a `docker-registry` child process as the origin ([`Registry`]), content
//! pushed through its HTTP API ([`content`]), a counting forwarding proxy in front of it to see
//! what reaches the origin ([`Tap`]), and a throwaway CA for TLS listeners ([`TestCa`]).
//! Include it with `mod common;`; each test binary uses a different subset, hence the
//! `dead_code` / `unused_imports` allowance.
#![allow(dead_code, unused_imports)]

pub mod airgap;
pub mod berth;
pub mod cluster;
pub mod containerd;
pub mod content;
pub mod fault;
pub mod issuer;
pub mod objstore;
pub mod pace;
pub mod registry;
pub mod tap;
pub mod tls;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;

pub use content::{
    delete_manifest, push_blob, push_docker_image, push_manifest, push_oci_image, push_oci_index,
    PlatformImage, TestImage, TestIndex,
};
pub use registry::Registry;
pub use tap::Tap;
pub use tls::TestCa;

/// Accepts connections on `listener` until the task is aborted and runs `serve` on each (with
/// `TCP_NODELAY`) in a task of its own; finished connections are reaped so the set does not grow
/// for the server's lifetime.
pub async fn accept_each<F, Fut>(listener: tokio::net::TcpListener, mut serve: F)
where
    F: FnMut(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            Some(_) = connections.join_next() => continue,
        };
        let _ = stream.set_nodelay(true);
        connections.spawn(serve(stream));
    }
}

/// Finds `name` on `PATH`, or panics with the package to install.
///
/// Tests never skip silently: a missing tool is a broken test machine, in CI and locally alike.
pub fn require_binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(found) = std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
    {
        return found;
    }
    let package = match name {
        "ctr" | "containerd" => "containerd",
        other => other,
    };
    let ci = if std::env::var("CI").as_deref() == Ok("true") {
        " (CI=true: the CI image must provide it)"
    } else {
        ""
    };
    panic!(
        "required binary `{name}` not found on PATH{ci}; install it with \
         `apt-get install {package}` — integration tests do not skip"
    );
}

/// Returns a port that was free a moment ago on 127.0.0.1.
///
/// Only for child processes that must be told their port up front; another process may take it
/// before the child binds, so callers retry on bind failure. In-process servers bind
/// `127.0.0.1:0` themselves instead.
pub fn free_port() -> u16 {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A loopback address that refuses connections for as long as the returned socket lives: the
/// socket holds the port bound but never listens, so no server of a test running alongside can
/// take the port (a port from [`free_port`] can be handed out again and answer).
pub fn refusing_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .expect("bind 127.0.0.1:0");
    let addr = socket.local_addr().expect("local address");
    (socket, addr)
}

/// Pulls `img` by tag from the registry API at `base` (berth, or an origin) and checks every
/// byte: the manifest exactly, each blob complete and matching its digest. Each request is
/// bounded (60 s): a hang is a failure.
pub async fn pull_and_verify(base: &str, img: &TestImage) {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("client");
    let url = format!("{base}/v2/{}/manifests/{}", img.repo, img.tag);
    let m = client
        .get(&url)
        .header("accept", content::OCI_MANIFEST)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    assert_eq!(m.status(), reqwest::StatusCode::OK, "{url}");
    assert_eq!(
        m.bytes().await.expect("manifest body").as_ref(),
        img.manifest_bytes
    );
    for (digest, bytes) in img.blobs() {
        let url = format!("{base}/v2/{}/blobs/{digest}", img.repo);
        let r = client
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(r.status(), reqwest::StatusCode::OK, "{digest}");
        let body = r.bytes().await.expect("complete body");
        assert_eq!(content::sha256_digest(&body), digest, "served bytes verify");
        assert_eq!(body.len(), bytes.len());
    }
}
