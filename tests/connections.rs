//! Connection hygiene, against the `berth` binary run as a real process (its open-file limit set
//! with `ulimit`): silent and half-sent connections are closed after their timeouts on both
//! listeners; a flood of them well past the open-file limit does not lock out real clients;
//! idle HTTP/1.1 keep-alive and HTTP/2 connections are closed after `idle_timeout`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_berth");

/// A request head missing its final blank line.
const HALF_SENT: &[u8] = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n";

/// Timeouts of the small tests: short, and distinct so that each close can be attributed.
const SHORT: &str = "handshake_timeout = \"2s\"\nheader_timeout = \"3s\"\nidle_timeout = \"2s\"\n";

/// `berth serve` under `bash -c 'ulimit ...; exec berth ...'`, killed on drop.
struct Berth {
    child: Child,
    port: u16,
    admin: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Berth {
    /// Starts berth with `server_keys` added to `[server]`, with the open-file limit (soft and
    /// hard) set to `fd_limit` when given, and waits until `/readyz` answers.
    async fn start(server_keys: &str, fd_limit: Option<u64>) -> Berth {
        let dir = tempfile::tempdir().expect("tempdir");
        let ulimit = fd_limit.map_or(String::new(), |n| format!("ulimit -HSn {n} && "));
        let mut last = String::new();
        for attempt in 0..4 {
            let (port, admin) = (common::free_port(), common::free_port());
            let config = dir.path().join(format!("berth-{attempt}.toml"));
            std::fs::write(
                &config,
                format!(
                    "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"2s\"\n{server_keys}\
                     [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
                     [cache]\ndir = \"{}\"\n\
                     [[upstream]]\nname = \"origin\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\nauth = \"public\"\n",
                    dir.path().join("cache").display()
                ),
            )
            .expect("write config");
            let log = dir.path().join(format!("berth-{attempt}.log"));
            let mut child = Command::new("bash")
                .arg("-c")
                .arg(format!(
                    "{ulimit}exec \"$0\" serve --log-format json --config \"$1\""
                ))
                .arg(BIN)
                .arg(&config)
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .spawn()
                .expect("spawn bash");
            match wait_ready(&mut child, admin, &log).await {
                Ok(()) => {
                    return Berth {
                        child,
                        port,
                        admin,
                        log,
                        _dir: dir,
                    }
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = e;
                    if !last.contains("in use") {
                        break;
                    }
                }
            }
        }
        panic!("berth did not become ready: {last}");
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn admin_addr(&self) -> String {
        format!("127.0.0.1:{}", self.admin)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin_addr()))
            .await
            .expect("metrics reachable")
            .text()
            .await
            .expect("metrics body")
    }

    /// Waits (at most 5 s) until `series` is at least `min`: a connection task counts its close
    /// just after the client sees it.
    async fn metric_reaches(&self, series: &str, min: f64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.metric(series).await >= min {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of the series whose line starts with `series` (name and labels).
    async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    }
}

/// Polls the admin listener's `/readyz` until it answers 200 (or berth exits, or 20 s pass).
async fn wait_ready(child: &mut Child, admin: u16, log: &Path) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .expect("client");
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}: {}", log()));
        }
        let url = format!("http://127.0.0.1:{admin}/readyz");
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("not ready within 20 s: {}", log()));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads until the server closes the connection (EOF or reset); how long that took from
/// `since`, or `None` if it stayed open past `limit`.
async fn closed_after(stream: &mut TcpStream, since: Instant, limit: Duration) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    let until = since + limit;
    loop {
        match tokio::time::timeout_at(until.into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// `GET /v2/` on a fresh connection; the time to a complete 200 answer.
async fn probe(addr: &str) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.expect("answer");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    started.elapsed()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::test]
async fn silent_and_half_sent_connections_are_closed_on_both_listeners() {
    let berth = Berth::start(SHORT, None).await;
    let mut cases = Vec::new();
    for (listener, addr) in [("client", berth.addr()), ("admin", berth.admin_addr())] {
        for half_sent in [false, true] {
            let opened = Instant::now();
            let mut s = TcpStream::connect(&addr).await.expect("connect");
            if half_sent {
                s.write_all(HALF_SENT).await.expect("send");
            }
            cases.push((listener, half_sent, opened, s));
        }
    }
    let watchers: Vec<_> = cases
        .into_iter()
        .map(|(listener, half_sent, opened, mut s)| {
            tokio::spawn(async move {
                let after = closed_after(&mut s, opened, Duration::from_secs(15)).await;
                (listener, half_sent, after)
            })
        })
        .collect();
    for w in watchers {
        let (listener, half_sent, after) = w.await.expect("watcher");
        let after = after
            .unwrap_or_else(|| panic!("{listener} half_sent={half_sent}: still open after 15 s"));
        // Silent: handshake_timeout (2 s); half-sent: header_timeout (3 s) after the first byte.
        let expected = if half_sent { 3.0 } else { 2.0 };
        println!(
            "{listener} half_sent={half_sent}: closed after {:.2} s",
            secs(after)
        );
        assert!(
            secs(after) >= expected - 0.3 && secs(after) < expected + 3.0,
            "{listener} half_sent={half_sent}: closed after {after:?}, expected about {expected} s"
        );
    }
    for listener in ["client", "admin"] {
        for reason in ["handshake_timeout", "header_timeout"] {
            let series = format!(
                "berth_connections_closed_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
            );
            assert!(berth.metric_reaches(&series, 1.0).await, "{series}");
        }
    }
    assert!(secs(probe(&berth.addr()).await) < 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_the_open_file_limit_does_not_lock_out_clients() {
    const SILENT: usize = 1500;
    const HALF: usize = 300;
    let mine = rlimit::increase_nofile_limit(8192).expect("raise the test's open-file limit");
    assert!(mine >= 4096, "the test needs 4096 descriptors, has {mine}");
    let keys = "handshake_timeout = \"5s\"\nheader_timeout = \"5s\"\n";
    let berth = Berth::start(keys, Some(1024)).await;
    let log = berth.log();
    assert!(
        log.lines().any(|l| l.contains("open-file limit")
            && l.contains("\"soft\":1024")
            && l.contains("\"hard\":1024")),
        "berth should run with 1024 descriptors:\n{log}"
    );
    let addr = berth.addr();

    // Fresh clients every 100 ms from the start of the flood until told to stop.
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let prober = tokio::spawn({
        let addr = addr.clone();
        async move {
            let mut latencies = Vec::new();
            loop {
                latencies.push(tokio::time::timeout(Duration::from_secs(10), probe(&addr)).await);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stopped.wait_for(|s| *s) => return latencies,
                }
            }
        }
    });

    let flood_start = Instant::now();
    let mut streams = Vec::with_capacity(SILENT + HALF);
    for i in 0..SILENT + HALF {
        let mut s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&addr))
            .await
            .unwrap_or_else(|_| panic!("connect {i}: no answer in 10 s"))
            .unwrap_or_else(|e| panic!("connect {i}: {e}"));
        let half = i >= SILENT;
        if half {
            // The server may already have shed it: a failed write is a closed connection too.
            let _ = s.write_all(HALF_SENT).await;
        }
        streams.push((half, s));
    }
    let flood_open = flood_start.elapsed();
    let mut watchers = tokio::task::JoinSet::new();
    for (half, mut s) in streams {
        watchers.spawn(async move {
            let after = closed_after(&mut s, flood_start, Duration::from_secs(40)).await;
            (half, after)
        });
    }
    // Keep probing for 3 s more while the last connections are held.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = stop.send(true);
    let latencies: Vec<Duration> = prober
        .await
        .expect("prober")
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|_| panic!("probe {i}: no answer in 10 s")))
        .collect();

    let mut closed = (Vec::new(), Vec::new());
    while let Some(r) = watchers.join_next().await {
        let (half, after) = r.expect("watcher");
        let after = after.unwrap_or_else(|| {
            panic!(
                "a {} connection was still open 40 s after the flood began",
                if half { "half-sent" } else { "silent" }
            )
        });
        if half {
            closed.1.push(after)
        } else {
            closed.0.push(after)
        }
    }
    let mut sorted = latencies.clone();
    sorted.sort();
    let max = *sorted.last().expect("probes ran");
    let median = sorted[sorted.len() / 2];
    let last_silent = closed.0.iter().max().copied().unwrap_or_default();
    let last_half = closed.1.iter().max().copied().unwrap_or_default();
    let shed = berth
        .metric("berth_connections_closed_total{listener=\"client\",reason=\"shed\"}")
        .await;
    let timed_out = berth
        .metric("berth_connections_closed_total{listener=\"client\",reason=\"handshake_timeout\"}")
        .await
        + berth
            .metric("berth_connections_closed_total{listener=\"client\",reason=\"header_timeout\"}")
            .await;
    println!(
        "flood: {} connections opened in {:.2} s; {} probes of GET /v2/: median {:.1} ms, max {:.1} ms; \
         all silent closed after {:.2} s, all half-sent after {:.2} s (from flood start); \
         {shed} shed, {timed_out} timed out",
        SILENT + HALF,
        secs(flood_open),
        latencies.len(),
        secs(median) * 1e3,
        secs(max) * 1e3,
        secs(last_silent),
        secs(last_half),
    );
    assert!(
        max < Duration::from_secs(2),
        "slowest probe {max:?}: {sorted:?}"
    );
    assert!(
        shed > 0.0 && timed_out > 0.0,
        "shed {shed}, timed out {timed_out}"
    );
    assert!(probe(&addr).await < Duration::from_secs(2));
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_idle_timeout() {
    let berth = Berth::start(SHORT, None).await;
    let tcp = TcpStream::connect(berth.addr()).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/v2/", berth.addr()))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    resp.into_body().collect().await.expect("body");
    let idle_from = Instant::now();
    tokio::time::timeout(Duration::from_secs(15), conn)
        .await
        .expect("HTTP/2 connection still open after 15 s")
        .expect("join")
        .expect("closed cleanly (GOAWAY)");
    let after = idle_from.elapsed();
    println!("HTTP/2 idle connection closed after {:.2} s", secs(after));
    assert!(
        secs(after) >= 1.7 && secs(after) < 5.0,
        "closed after {after:?}, idle_timeout is 2 s"
    );
    let series = "berth_connections_closed_total{listener=\"client\",reason=\"idle_timeout\"}";
    assert!(berth.metric_reaches(series, 1.0).await, "{series}");
}

#[tokio::test]
async fn an_idle_http1_keepalive_connection_is_closed_after_idle_timeout() {
    let berth = Berth::start(SHORT, None).await;
    let mut s = TcpStream::connect(berth.addr()).await.expect("connect");
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    // Read the head, then the body by its Content-Length.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    while got.len() < head_end + length {
        let n = s.read(&mut buf).await.expect("read body");
        assert!(n > 0, "closed mid-body");
        got.extend_from_slice(&buf[..n]);
    }
    let idle_from = Instant::now();
    let after = closed_after(&mut s, idle_from, Duration::from_secs(15))
        .await
        .expect("HTTP/1.1 keep-alive connection still open after 15 s");
    println!(
        "HTTP/1.1 idle keep-alive connection closed after {:.2} s",
        secs(after)
    );
    // idle_timeout (2 s) closes it, before hyper's header timeout (3 s) would.
    assert!(
        secs(after) >= 1.7 && secs(after) < 2.9,
        "closed after {after:?}, idle_timeout is 2 s"
    );
    let series = "berth_connections_closed_total{listener=\"client\",reason=\"idle_timeout\"}";
    assert!(berth.metric_reaches(series, 1.0).await, "{series}");
}
