//! The serving certificate is reloaded when its files change (cert-manager and the kubelet
//! rotate them in place): new connections get the new certificate, connections established
//! before keep working, and a half-written rotation (new certificate, old key) keeps the last
//! good pair until the rotation completes.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::berth::Berth;
use common::{Registry, TestCa};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

fn connector(ca: &TestCa) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca.ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// A verified TLS connection to berth and the end-entity certificate it presented.
async fn connect(berth: &Berth, ca: &TestCa) -> (TlsStream<TcpStream>, CertificateDer<'static>) {
    let tcp = TcpStream::connect(berth.addr).await.unwrap();
    let tls = connector(ca)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake verifies against the test CA");
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    (tls, presented)
}

fn pem_der(pem: &str) -> CertificateDer<'static> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
}

/// An HTTP/1.1 connection over `tls`; returns a sender whose requests go over that one
/// connection.
async fn http1(tls: TlsStream<TcpStream>) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn get_v2(send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>) -> u16 {
    send.ready().await.expect("connection still open");
    let req = http::Request::get("/v2/")
        .header("host", "localhost")
        .body(Empty::new())
        .unwrap();
    let resp = send
        .send_request(req)
        .await
        .expect("request on the old connection");
    let status = resp.status().as_u16();
    resp.into_body().collect().await.unwrap();
    status
}

#[tokio::test]
async fn rotated_certificate_serves_new_connections_and_old_ones_stay_up() {
    let registry = Registry::start().await;
    let mut ca = TestCa::new();
    let berth = Berth::in_front_of(&registry.url()).tls(&ca).start().await;

    let first = pem_der(ca.server_cert_pem());
    let (tls, presented) = connect(&berth, &ca).await;
    assert_eq!(presented, first);
    let mut old = http1(tls).await;
    assert_eq!(get_v2(&mut old).await, 200);

    ca.rotate_server_cert();
    let second = pem_der(ca.server_cert_pem());
    assert_ne!(first, second);
    let (_tls, presented) = connect(&berth, &ca).await;
    assert_eq!(
        presented, second,
        "a new connection gets the rotated certificate"
    );
    assert_eq!(
        get_v2(&mut old).await,
        200,
        "the connection made before the rotation still serves"
    );

    // Half a rotation: the new certificate is in place, its key is not yet. berth keeps the
    // last good pair rather than failing handshakes, and takes the new one once the key lands.
    let second_key = ca.server_key_pem().to_owned();
    ca.rotate_server_cert();
    let third = pem_der(ca.server_cert_pem());
    let third_key = ca.server_key_pem().to_owned();
    std::fs::write(ca.server_key_path(), &second_key).unwrap();
    let (_tls, presented) = connect(&berth, &ca).await;
    assert_eq!(
        presented, second,
        "mismatched pair: the previous certificate is kept"
    );
    std::fs::write(ca.server_key_path(), &third_key).unwrap();
    let (_tls, presented) = connect(&berth, &ca).await;
    assert_eq!(presented, third, "completed rotation is picked up");
    assert_eq!(get_v2(&mut old).await, 200);
    berth.stop().await;
}
