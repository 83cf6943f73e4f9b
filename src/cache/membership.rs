//! Repository membership evidence: which digests the origin of an upstream has shown to belong
//! to which of its repositories (docs/ARCHITECTURE.md, "Authorization").
//!
//! Bytes are stored once per digest; the right to read them under `(upstream, repository)` is
//! recorded here, and only from the origin's own word: a manifest the origin served for that
//! repository (its digest, `config`, `layers`, `manifests`) or a 2xx to a HEAD/GET of the digest
//! there. The proxy records; the authorizer asks.
//!
//! The set lives in memory (bounded) and in `<cache dir>/memberships.log`, an append-only file
//! written by one background thread, so a restart does not turn into a HEAD storm at the origin.
//! Each line carries a check value derived from its content; a torn or damaged line (a crash
//! mid-append, a flipped byte) fails the check and is skipped, never read as another
//! repository's name. The file is compacted (temp file, fsync, rename, directory fsync) when it
//! grows past twice the bound.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Mutex;
use std::thread::JoinHandle;

use moka::sync::Cache;
use sha2::{Digest as _, Sha256};

use crate::oci::Digest;

/// File name of the membership log in the cache directory.
pub const MEMBERSHIP_FILE: &str = "memberships.log";
/// Most memberships kept (memory and, up to twice that, the log).
pub const MAX_MEMBERSHIPS: u64 = 1_000_000;
/// Records queued for the writer thread before new ones are only kept in memory.
const QUEUE: usize = 65_536;

/// What is known of a digest in a repository.
const MEMBER: u8 = 1;
/// A manifest whose references were recorded too.
const MANIFEST_WALKED: u8 = 2;

/// The identity of one membership: a hash of (upstream, repository, digest), so a lookup
/// allocates nothing and an entry costs the same whatever the names' lengths.
type MemberKey = [u8; 32];

fn member_key(upstream: &str, repo: &str, digest: &Digest) -> MemberKey {
    let mut h = Sha256::new();
    h.update(upstream.as_bytes());
    h.update([0]);
    h.update(repo.as_bytes());
    h.update([0]);
    h.update(digest.as_str().as_bytes());
    h.finalize().into()
}

/// One log line for a membership: `<check> <upstream> <repository> <digest>`.
fn log_line(upstream: &str, repo: &str, digest: &Digest, key: &MemberKey) -> String {
    format!("{} {upstream} {repo} {digest}\n", hex::encode(&key[..6]))
}

/// Parses a log line; `None` for anything damaged (wrong field count, a digest cut short, a
/// check value that does not match the content).
fn parse_line(line: &str) -> Option<MemberKey> {
    let mut it = line.split(' ');
    let (check, upstream, repo, digest) = (it.next()?, it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || upstream.is_empty() || repo.is_empty() {
        return None;
    }
    let digest: Digest = digest.parse().ok()?;
    let key = member_key(upstream, repo, &digest);
    (check == hex::encode(&key[..6])).then_some(key)
}

enum Msg {
    Add(String),
    Flush(SyncSender<()>),
}

/// The membership set: memory-bounded, persisted by a background writer.
pub struct Memberships {
    set: Cache<MemberKey, u8>,
    tx: Mutex<Option<SyncSender<Msg>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    dropped: AtomicU64,
}

impl Memberships {
    /// A set kept in memory only (tests, tools without a cache directory).
    pub fn in_memory() -> Memberships {
        Memberships {
            set: Cache::builder().max_capacity(MAX_MEMBERSHIPS).build(),
            tx: Mutex::new(None),
            writer: Mutex::new(None),
            dropped: AtomicU64::new(0),
        }
    }

    /// Loads `<dir>/memberships.log` (damaged lines are skipped and counted in a warning) and
    /// starts the writer that appends new records to it. A log that cannot be read or written
    /// is logged and berth runs with memberships in memory only: it asks the origin again,
    /// which is slower, never wrong, and never a refusal to start.
    pub fn open(dir: &Path) -> Memberships {
        let path = dir.join(MEMBERSHIP_FILE);
        match Memberships::try_open(&path) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot use the membership log; memberships are kept in memory only");
                Memberships::in_memory()
            }
        }
    }

    fn try_open(path: &Path) -> io::Result<Memberships> {
        let path = path.to_owned();
        let m = Memberships::in_memory();
        let (mut lines, mut damaged) = (0u64, 0u64);
        match File::open(&path) {
            Ok(f) => {
                for line in BufReader::new(f).split(b'\n') {
                    let Ok(line) = line else {
                        // An unreadable stretch: what was read counts, the rest is asked again.
                        damaged += 1;
                        break;
                    };
                    lines += 1;
                    match std::str::from_utf8(&line).ok().and_then(parse_line) {
                        Some(key) => {
                            if m.set.get(&key).is_none() {
                                m.set.insert(key, MEMBER);
                            }
                        }
                        None => damaged += 1,
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the membership log; starting without it (memberships are asked of the origin again)");
            }
        }
        if damaged > 0 {
            tracing::warn!(
                path = %path.display(),
                damaged,
                "skipped damaged membership records (an interrupted write); they are asked of the origin again"
            );
        }
        m.set.run_pending_tasks();
        // A damaged tail would glue the next append to it: rewrite the file clean first.
        let mut written = lines;
        if damaged > 0 || lines > 2 * MAX_MEMBERSHIPS {
            written = compact(&path, &m.set)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let set = m.set.clone();
        let handle = std::thread::Builder::new()
            .name("berth-memberships".into())
            .spawn(move || write_loop(path, file, rx, set, written))?;
        *m.tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        *m.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        tracing::debug!(loaded = m.set.entry_count(), "membership log loaded");
        Ok(m)
    }

    /// Whether `digest` is known to belong to `repo` at `upstream`.
    pub fn contains(&self, upstream: &str, repo: &str, digest: &Digest) -> bool {
        self.set.contains_key(&member_key(upstream, repo, digest))
    }

    /// Records that the origin of `upstream` showed `digest` in `repo`.
    pub fn record(&self, upstream: &str, repo: &str, digest: &Digest) {
        let key = member_key(upstream, repo, digest);
        if self.set.contains_key(&key) {
            return;
        }
        self.set.insert(key, MEMBER);
        self.persist(log_line(upstream, repo, digest, &key));
    }

    /// Records a manifest the origin of `upstream` showed in `repo` (its digest verified), and
    /// everything it references by `config`, `layers` and `manifests` (never `subject`).
    /// Cheap when the manifest was recorded before: one lookup.
    pub fn record_manifest(&self, upstream: &str, repo: &str, digest: &Digest, manifest: &[u8]) {
        let key = member_key(upstream, repo, digest);
        if self.set.get(&key) == Some(MANIFEST_WALKED) {
            return;
        }
        let fresh = !self.set.contains_key(&key);
        for d in referenced_digests(manifest) {
            self.record(upstream, repo, &d);
        }
        self.set.insert(key, MANIFEST_WALKED);
        if fresh {
            self.persist(log_line(upstream, repo, digest, &key));
        }
    }

    fn persist(&self, line: String) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = tx.as_ref() {
            if tx.try_send(Msg::Add(line)).is_err()
                && self.dropped.fetch_add(1, Ordering::Relaxed) == 0
            {
                tracing::warn!(
                    "membership log writer is behind; new memberships are kept in memory only"
                );
            }
        }
    }

    /// Waits until every record so far is written and synced to disk.
    pub fn flush(&self) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(tx) = tx {
            let (ack, done) = mpsc::sync_channel(1);
            if tx.send(Msg::Flush(ack)).is_ok() {
                let _ = done.recv();
            }
        }
    }

    /// Memberships in memory.
    pub fn len(&self) -> u64 {
        self.set.run_pending_tasks();
        self.set.entry_count()
    }

    /// Whether none is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Memberships {
    fn drop(&mut self) {
        // Closing the queue lets the writer drain it, sync and stop.
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
    }
}

/// The writer thread: appends queued records, syncs after each batch, acknowledges flushes,
/// compacts when the file holds more than twice the bound.
fn write_loop(
    path: PathBuf,
    file: File,
    rx: Receiver<Msg>,
    set: Cache<MemberKey, u8>,
    mut lines: u64,
) {
    let mut out = BufWriter::new(file);
    let mut acks: Vec<SyncSender<()>> = Vec::new();
    let mut failed = false;
    'outer: while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        loop {
            match next.take() {
                Some(Msg::Add(line)) => {
                    if out.write_all(line.as_bytes()).is_err() && !failed {
                        failed = true;
                    }
                    lines += 1;
                }
                Some(Msg::Flush(ack)) => acks.push(ack),
                None => {}
            }
            match rx.try_recv() {
                Ok(m) => next = Some(m),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    sync(&mut out, &path, &mut failed);
                    break 'outer;
                }
            }
        }
        sync(&mut out, &path, &mut failed);
        if lines > 2 * MAX_MEMBERSHIPS {
            match compact(&path, &set).and_then(|n| {
                let f = OpenOptions::new().append(true).open(&path)?;
                Ok((n, f))
            }) {
                Ok((n, f)) => {
                    lines = n;
                    out = BufWriter::new(f);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot compact the membership log")
                }
            }
        }
        for a in acks.drain(..) {
            let _ = a.send(());
        }
    }
    for a in acks.drain(..) {
        let _ = a.send(());
    }
}

fn sync(out: &mut BufWriter<File>, path: &Path, failed: &mut bool) {
    let r = out.flush().and_then(|_| out.get_ref().sync_data());
    if let Err(e) = r {
        if !*failed {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the membership log; memberships are kept in memory only");
        }
        *failed = true;
    }
}

/// Rewrites the log with one line per membership still in `set`: temp file, fsync, rename,
/// directory fsync. Returns the lines written.
fn compact(path: &Path, set: &Cache<MemberKey, u8>) -> io::Result<u64> {
    let temp = path.with_extension("log.tmp");
    let mut seen: HashSet<MemberKey> = HashSet::new();
    let mut out = BufWriter::new(File::create(&temp)?);
    if let Ok(f) = File::open(path) {
        for line in BufReader::new(f).split(b'\n') {
            let Ok(line) = line else { break };
            let Ok(text) = std::str::from_utf8(&line) else {
                continue;
            };
            if let Some(key) = parse_line(text) {
                if set.contains_key(&key) && seen.insert(key) {
                    out.write_all(text.as_bytes())?;
                    out.write_all(b"\n")?;
                }
            }
        }
    }
    out.flush()?;
    out.get_ref().sync_all()?;
    drop(out);
    fs::rename(&temp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(seen.len() as u64)
}

/// Every digest a manifest or index lists as its parts: `config`, `layers`, `manifests` (and a
/// schema 1 manifest's `fsLayers`). Never `subject`: a registry accepts a subject it cannot
/// resolve, so it proves nothing about the repository.
pub fn referenced_digests(manifest: &[u8]) -> Vec<Digest> {
    #[derive(serde::Deserialize)]
    struct Descriptor {
        digest: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Manifest {
        config: Option<Descriptor>,
        #[serde(default)]
        layers: Vec<Descriptor>,
        #[serde(default)]
        manifests: Vec<Descriptor>,
        #[serde(default, rename = "fsLayers")]
        fs_layers: Vec<V1Layer>,
    }
    #[derive(serde::Deserialize)]
    struct V1Layer {
        #[serde(rename = "blobSum")]
        blob_sum: Option<String>,
    }
    let Ok(m) = serde_json::from_slice::<Manifest>(manifest) else {
        return Vec::new();
    };
    m.config
        .into_iter()
        .chain(m.layers)
        .chain(m.manifests)
        .filter_map(|d| d.digest)
        .chain(m.fs_layers.into_iter().filter_map(|l| l.blob_sum))
        .filter_map(|d| d.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_parts_but_never_the_subject() {
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"b");
        let s = Digest::sha256_of(b"subject");
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{a}"}},"layers":[{{"digest":"{b}"}},{{"digest":"bogus"}}],"subject":{{"digest":"{s}"}}}}"#
        );
        assert_eq!(referenced_digests(m.as_bytes()), vec![a.clone(), b]);
        let idx = format!(r#"{{"manifests":[{{"digest":"{a}"}}]}}"#);
        assert_eq!(referenced_digests(idx.as_bytes()), vec![a]);
        assert!(referenced_digests(b"not json").is_empty());
    }

    #[test]
    fn scoped_by_upstream_and_repository() {
        let m = Memberships::in_memory();
        let d = Digest::sha256_of(b"x");
        m.record("up", "team/a", &d);
        assert!(m.contains("up", "team/a", &d));
        assert!(!m.contains("other", "team/a", &d));
        assert!(!m.contains("up", "team/b", &d));
        // Names that concatenate alike stay apart.
        assert!(!m.contains("upt", "eam/a", &d));
    }

    #[test]
    fn survives_restart_and_skips_damaged_lines() {
        let dir = tempfile::tempdir().unwrap();
        let (d1, d2, d3) = (
            Digest::sha256_of(b"1"),
            Digest::sha256_of(b"2"),
            Digest::sha256_of(b"3"),
        );
        {
            let m = Memberships::open(dir.path());
            m.record("up", "team/a", &d1);
            m.record("up", "team/b", &d2);
            m.flush();
        }
        let path = dir.path().join(MEMBERSHIP_FILE);
        let mut text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        // A torn append (the digest cut short) and a line whose repository was altered: a
        // truncated or edited name must never become a membership of another repository.
        let good = log_line("up", "team/c", &d3, &member_key("up", "team/c", &d3));
        let altered = good.replace("team/c", "team/x");
        text.push_str(&altered);
        text.push_str(&good[..good.len() - 10]);
        fs::write(&path, &text).unwrap();
        let m = Memberships::open(dir.path());
        assert!(m.contains("up", "team/a", &d1));
        assert!(m.contains("up", "team/b", &d2));
        assert!(!m.contains("up", "team/x", &d3));
        assert!(!m.contains("up", "team/c", &d3));
        // The damaged tail was rewritten away: the next append starts on a clean line.
        m.record("up", "team/c", &d3);
        m.flush();
        drop(m);
        let m = Memberships::open(dir.path());
        assert!(m.contains("up", "team/c", &d3));
        assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), 3);
    }

    #[test]
    fn an_unusable_log_is_no_refusal_to_start() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the log should be: neither readable nor writable as a file.
        fs::create_dir(dir.path().join(MEMBERSHIP_FILE)).unwrap();
        let m = Memberships::open(dir.path());
        let d = Digest::sha256_of(b"x");
        m.record("up", "r", &d);
        m.flush();
        assert!(m.contains("up", "r", &d));
    }

    #[test]
    fn manifests_record_their_parts_once() {
        let m = Memberships::in_memory();
        let (top, cfg, layer, subj) = (
            Digest::sha256_of(b"top"),
            Digest::sha256_of(b"cfg"),
            Digest::sha256_of(b"layer"),
            Digest::sha256_of(b"subj"),
        );
        let body = format!(
            r#"{{"config":{{"digest":"{cfg}"}},"layers":[{{"digest":"{layer}"}}],"subject":{{"digest":"{subj}"}}}}"#
        );
        m.record_manifest("up", "r", &top, body.as_bytes());
        for d in [&top, &cfg, &layer] {
            assert!(m.contains("up", "r", d));
        }
        assert!(!m.contains("up", "r", &subj));
        assert!(!m.contains("up", "other", &cfg));
    }
}
