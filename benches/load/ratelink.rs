//! A paced TCP link for the load benchmark: `ratelink LISTEN TARGET RATE` (bytes per second).
//!
//! Forwards every connection accepted on LISTEN to TARGET; what TARGET sends back is paced to
//! RATE per connection against an absolute schedule (byte n of a response leaves no
//! earlier than n / rate after its first), so a transfer of any length averages the rate. It stands
//! in for the WAN between a registry cache and its origin. nginx's `limit_rate`, the obvious
//! alternative, paces per whole second and lets short transfers run up to twice the rate.
//!
//! `benches/prefetch.rs` includes this file as a module and runs [`run`] in process.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Largest burst written at once.
const CHUNK: usize = 64 * 1024;

/// How far behind its schedule the link may fall before it counts as idle and starts afresh.
const IDLE_CREDIT: Duration = Duration::from_millis(5);

fn usage() -> ! {
    eprintln!("usage: ratelink LISTEN_ADDR TARGET_ADDR RATE (bytes per second, or a size: 500MiB)");
    std::process::exit(64)
}

/// Copies `from` to `to`, never faster than `rate` bytes per second, adding what it sent to
/// `total`.
async fn paced(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    rate: f64,
    total: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut t0 = Instant::now();
    let mut sent = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        let now = Instant::now();
        let due = t0 + Duration::from_secs_f64(sent as f64 / rate);
        if due + IDLE_CREDIT < now {
            // The link was idle (between requests on a kept-alive connection): start a new
            // schedule instead of letting the idle time turn into a burst.
            t0 = now;
            sent = 0;
        } else {
            tokio::time::sleep_until(due).await;
        }
        to.write_all(&buf[..n]).await?;
        sent += n as u64;
        total.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn serve(
    client: TcpStream,
    target: SocketAddr,
    rate: f64,
    total: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let origin = TcpStream::connect(target).await?;
    client.set_nodelay(true)?;
    origin.set_nodelay(true)?;
    let (mut client_r, client_w) = client.into_split();
    let (origin_r, mut origin_w) = origin.into_split();
    let up = async move {
        tokio::io::copy(&mut client_r, &mut origin_w).await?;
        origin_w.shutdown().await
    };
    let (a, b) = tokio::join!(up, paced(origin_r, client_w, rate, total));
    a.and(b)
}

/// Serves the link on `listener` until the task is dropped: every connection to `target`,
/// responses paced to `rate` bytes per second each; `total` counts the bytes sent back.
pub async fn run(listener: TcpListener, target: SocketAddr, rate: f64, total: Arc<AtomicU64>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let total = total.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(client, target, rate, total).await {
                eprintln!("ratelink: connection ended: {e}");
            }
        });
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, target, rate] = args.as_slice() else {
        usage()
    };
    let (Ok(listen), Ok(target), Some(rate)) = (
        listen.parse::<SocketAddr>(),
        target.parse::<SocketAddr>(),
        berth::config::units::parse_size(rate)
            .ok()
            .filter(|r| *r > 0)
            .map(|r| r as f64),
    ) else {
        usage()
    };
    let listener = TcpListener::bind(listen).await.unwrap_or_else(|e| {
        eprintln!("ratelink: cannot listen on {listen}: {e}");
        std::process::exit(1)
    });
    run(listener, target, rate, Arc::default()).await;
}
