//! The disk tier's index: which objects are on disk, their sizes, and their recency, under a
//! strict byte budget.
//!
//! Policy: segmented LRU (SLRU). A new object enters the *probation* segment; a hit promotes it
//! to *protected* (capped at [`PROTECTED_SHARE`] of the budget, overflow demoted back to
//! probation). Eviction takes probation's least recent first, then protected's. A blob pulled
//! once (a one-off image, a scan) cannot push out the layers every node pulls, which plain LRU
//! lets it do; and unlike an admission filter (TinyLFU) a first pull is always stored, so the
//! second pull of a new image is a hit. `benches/hit_ratio.rs` measures it against LRU and moka.
//!
//! Space is reserved before a fill writes a byte ([`DiskIndex::reserve`]), so committed bytes
//! plus bytes being written never exceed the budget, however many fills run at once. Eviction
//! only unlinks files: a reader that already opened one finishes undisturbed.
//!
//! Architecture: docs/ARCHITECTURE.md, "Cache".

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::oci::Digest;

/// Share of the budget the protected segment may hold.
pub const PROTECTED_SHARE: f64 = 0.8;

/// What an object is: the two kinds live in separate directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// A layer or config blob.
    Blob,
    /// A manifest or index.
    Manifest,
}

impl ObjectKind {
    /// Directory name and label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Blob => "blobs",
            ObjectKind::Manifest => "manifests",
        }
    }
}

/// An object's identity on disk.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// Blob or manifest.
    pub kind: ObjectKind,
    /// Its digest.
    pub digest: Digest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Segment {
    Probation,
    Protected,
    /// Never evicted (warmed with `--pin`); counted in the budget.
    Pinned,
}

#[derive(Debug)]
struct Entry {
    size: u64,
    tick: u64,
    segment: Segment,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    probation: BTreeMap<u64, Key>,
    protected: BTreeMap<u64, Key>,
    tick: u64,
    used: u64,
    protected_bytes: u64,
    pinned_bytes: u64,
    reserved: u64,
    evictions: u64,
    dirty: bool,
    /// Highest `used + reserved` any fill left behind (reserve, grow, commit).
    peak: u64,
}

/// Why space could not be reserved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    /// The object alone is larger than the whole budget: serve it without storing.
    #[error("object of {size} bytes exceeds the disk budget of {budget} bytes")]
    TooLarge {
        /// Requested bytes.
        size: u64,
        /// The budget.
        budget: u64,
    },
    /// In-flight reservations and pinned objects hold the space (nothing left to evict).
    #[error("disk budget is taken by pinned objects and fills in progress")]
    Busy,
}

/// Why objects could not be pinned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// An object to pin is not on disk.
    #[error("{0} is not in the cache")]
    NotCached(String),
    /// Pinning would leave less than nothing of the budget for everything else.
    #[error("pinning {wanted} more bytes would exceed the disk budget ({pinned} of {budget} bytes already pinned); raise cache.disk_bytes")]
    WouldNotFit {
        /// Bytes the new pins add.
        wanted: u64,
        /// Bytes already pinned.
        pinned: u64,
        /// The budget.
        budget: u64,
    },
}

/// The index and its budget.
pub struct DiskIndex {
    budget: u64,
    inner: Mutex<Inner>,
}

/// Space held for a fill; released on drop unless committed.
pub struct Reservation {
    index: Arc<DiskIndex>,
    bytes: u64,
}

/// Point-in-time figures for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of committed objects.
    pub used: u64,
    /// Bytes reserved by fills in progress.
    pub reserved: u64,
    /// Number of committed objects.
    pub objects: u64,
    /// Evictions since start.
    pub evictions: u64,
    /// Bytes of pinned objects.
    pub pinned: u64,
    /// Highest committed plus reserved bytes a fill ever held: the budget's own record that
    /// it was never exceeded (objects loaded at start-up are not counted).
    pub peak: u64,
}

// === impl DiskIndex ===

impl DiskIndex {
    /// An empty index with a byte budget.
    pub fn new(budget: u64) -> Arc<DiskIndex> {
        Arc::new(DiskIndex {
            budget,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// The state, audited when the guard drops in builds with debug assertions (tests): every
    /// change is checked against the index's own accounting.
    fn lock(&self) -> Guard<'_> {
        Guard(self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Current figures.
    pub fn usage(&self) -> Usage {
        let i = self.lock();
        Usage {
            used: i.used,
            reserved: i.reserved,
            objects: i.entries.len() as u64,
            evictions: i.evictions,
            pinned: i.pinned_bytes,
            peak: i.peak,
        }
    }

    /// The size recorded for `key`, if indexed.
    pub fn size_of(&self, key: &Key) -> Option<u64> {
        self.lock().entries.get(key).map(|e| e.size)
    }

    /// Every indexed object with its recorded size (pinned ones included), for a scrub.
    pub fn entries(&self) -> Vec<(Key, u64)> {
        self.lock()
            .entries
            .iter()
            .map(|(k, e)| (k.clone(), e.size))
            .collect()
    }

    /// Whether `key` is indexed.
    pub fn contains(&self, key: &Key) -> bool {
        self.lock().entries.contains_key(key)
    }

    /// Records a hit: the object moves to the protected segment's most recent end.
    pub fn touch(&self, key: &Key) -> bool {
        let mut i = self.lock();
        let budget = self.budget;
        i.touch(key, budget)
    }

    /// Adds a pinned object found on disk at startup.
    pub fn load_pinned(&self, key: Key, size: u64) {
        let mut i = self.lock();
        i.insert(key, size, Segment::Pinned);
        i.dirty = false;
    }

    /// Adds an object found on disk at startup, as most recent of `protected` or probation.
    pub fn load(&self, key: Key, size: u64, protected: bool) {
        let mut i = self.lock();
        i.insert(
            key,
            size,
            if protected {
                Segment::Protected
            } else {
                Segment::Probation
            },
        );
        i.dirty = false;
    }

    /// Holds `bytes` of budget for a fill, evicting least recent objects as needed. Returns the
    /// reservation and the keys evicted, whose files the caller deletes before writing.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Result<(Reservation, Vec<Key>), ReserveError> {
        let mut i = self.lock();
        let evicted = i.make_room(bytes, self.budget)?;
        i.reserved += bytes;
        i.note_fill(self.budget);
        Ok((
            Reservation {
                index: self.clone(),
                bytes,
            },
            evicted,
        ))
    }

    /// Pins objects so that eviction never takes them: all or none. Refused when they are not
    /// all on disk, or when pinned bytes would exceed the budget.
    pub fn pin(&self, keys: &[Key]) -> Result<(), PinError> {
        let mut i = self.lock();
        let mut wanted = 0;
        for k in keys {
            match i.entries.get(k) {
                None => return Err(PinError::NotCached(k.digest.to_string())),
                Some(e) if e.segment != Segment::Pinned => wanted += e.size,
                Some(_) => {}
            }
        }
        if i.pinned_bytes + wanted > self.budget {
            return Err(PinError::WouldNotFit {
                wanted,
                pinned: i.pinned_bytes,
                budget: self.budget,
            });
        }
        for k in keys {
            i.pin(k);
        }
        Ok(())
    }

    /// Makes pinned objects evictable again, as the next victims of the probation segment.
    pub fn unpin(&self, keys: &[Key]) {
        let mut i = self.lock();
        for k in keys {
            let Some(e) = i.entries.get(k) else { continue };
            if e.segment != Segment::Pinned {
                continue;
            }
            let size = e.size;
            // Oldest possible tick: in front of every probation entry.
            let tick = i.probation.keys().next().map_or(0, |t| t.saturating_sub(1));
            let tick = if i.probation.contains_key(&tick) || i.protected.contains_key(&tick) {
                i.next_tick()
            } else {
                tick
            };
            let e = i.entries.get_mut(k).expect("checked above");
            e.segment = Segment::Probation;
            e.tick = tick;
            i.pinned_bytes -= size;
            i.probation.insert(tick, k.clone());
            i.dirty = true;
        }
    }

    /// Whether an object is pinned.
    pub fn is_pinned(&self, key: &Key) -> bool {
        self.lock()
            .entries
            .get(key)
            .is_some_and(|e| e.segment == Segment::Pinned)
    }

    /// Drops an object from the index (its file is gone or being deleted).
    pub fn remove(&self, key: &Key) -> Option<u64> {
        let mut i = self.lock();
        i.remove(key)
    }

    /// Every key in eviction order (next victim first) with its segment, for the recency
    /// snapshot; clears the dirty flag.
    pub fn snapshot(&self) -> Vec<(Key, bool)> {
        let mut i = self.lock();
        i.dirty = false;
        i.probation
            .values()
            .map(|k| (k.clone(), false))
            .chain(i.protected.values().map(|k| (k.clone(), true)))
            .collect()
    }

    /// Whether recency changed since the last snapshot.
    pub fn is_dirty(&self) -> bool {
        self.lock().dirty
    }
}

// === impl Reservation ===

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Holds `more` bytes (a body longer than announced, or of unknown length).
    pub fn grow(&mut self, more: u64) -> Result<Vec<Key>, ReserveError> {
        let mut i = self.index.lock();
        let evicted = i.make_room(more, self.index.budget)?;
        i.reserved += more;
        self.bytes += more;
        i.note_fill(self.index.budget);
        Ok(evicted)
    }

    /// Turns the reservation into the committed object `key` of `size` bytes (at most the
    /// reservation). Returns anything evicted to make the exchange (nothing in practice).
    pub fn commit(mut self, key: Key, size: u64) -> Vec<Key> {
        let mut i = self.index.lock();
        i.reserved -= self.bytes;
        let held = std::mem::take(&mut self.bytes);
        let mut evicted = Vec::new();
        if i.entries.contains_key(&key) {
            // Someone committed the same content first; this copy replaced it on disk.
            i.remove(&key);
        }
        if size > held {
            if let Ok(e) = i.make_room(size - held, self.index.budget) {
                evicted = e;
            }
        }
        i.insert(key, size, Segment::Probation);
        i.note_fill(self.index.budget);
        evicted
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut i = self.index.lock();
            i.reserved -= self.bytes;
        }
    }
}

/// The locked state; see [`DiskIndex::lock`].
struct Guard<'a>(MutexGuard<'a, Inner>);

impl std::ops::Deref for Guard<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl std::ops::DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.0
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        if !std::thread::panicking() {
            if let Err(e) = self.0.audit() {
                panic!("disk index accounting broken: {e}");
            }
        }
    }
}

// === impl Inner ===

impl Inner {
    /// Records what a fill left behind; a fill never takes the cache past its budget.
    fn note_fill(&mut self, budget: u64) {
        let held = self.used + self.reserved;
        self.peak = self.peak.max(held);
        debug_assert!(
            held <= budget,
            "a fill took the disk cache over its budget: {held} > {budget}"
        );
    }

    /// Checks the running totals against the entries and the segment maps.
    #[cfg(debug_assertions)]
    fn audit(&self) -> Result<(), String> {
        let (mut used, mut protected, mut pinned) = (0u64, 0u64, 0u64);
        for (k, e) in &self.entries {
            used += e.size;
            let listed = match e.segment {
                Segment::Probation => self.probation.get(&e.tick) == Some(k),
                Segment::Protected => {
                    protected += e.size;
                    self.protected.get(&e.tick) == Some(k)
                }
                Segment::Pinned => {
                    pinned += e.size;
                    true
                }
            };
            if !listed {
                return Err(format!("{k:?} missing from its segment"));
            }
        }
        let pinned_count = self
            .entries
            .values()
            .filter(|e| e.segment == Segment::Pinned)
            .count();
        let listed = self.probation.len() + self.protected.len() + pinned_count;
        if (used, protected, pinned) != (self.used, self.protected_bytes, self.pinned_bytes)
            || listed != self.entries.len()
        {
            return Err(format!(
                "totals used {}/{used}, protected {}/{protected}, pinned {}/{pinned}, \
                 listed {listed}/{}",
                self.used,
                self.protected_bytes,
                self.pinned_bytes,
                self.entries.len()
            ));
        }
        Ok(())
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.dirty = true;
        self.tick
    }

    fn insert(&mut self, key: Key, size: u64, segment: Segment) {
        if self.entries.contains_key(&key) {
            return;
        }
        let tick = self.next_tick();
        match segment {
            Segment::Probation => {
                self.probation.insert(tick, key.clone());
            }
            Segment::Protected => {
                self.protected_bytes += size;
                self.protected.insert(tick, key.clone());
            }
            Segment::Pinned => self.pinned_bytes += size,
        }
        self.used += size;
        self.entries.insert(
            key,
            Entry {
                size,
                tick,
                segment,
            },
        );
    }

    fn remove(&mut self, key: &Key) -> Option<u64> {
        let e = self.entries.remove(key)?;
        match e.segment {
            Segment::Probation => {
                self.probation.remove(&e.tick);
            }
            Segment::Protected => {
                self.protected.remove(&e.tick);
                self.protected_bytes -= e.size;
            }
            Segment::Pinned => self.pinned_bytes -= e.size,
        }
        self.used -= e.size;
        self.dirty = true;
        Some(e.size)
    }

    fn touch(&mut self, key: &Key, budget: u64) -> bool {
        let tick = self.next_tick();
        let Some(e) = self.entries.get_mut(key) else {
            return false;
        };
        if e.segment == Segment::Pinned {
            return true;
        }
        let (old_tick, old_segment, size) = (e.tick, e.segment, e.size);
        e.tick = tick;
        e.segment = Segment::Protected;
        match old_segment {
            Segment::Probation => {
                self.probation.remove(&old_tick);
                self.protected_bytes += size;
            }
            Segment::Protected => {
                self.protected.remove(&old_tick);
            }
            Segment::Pinned => unreachable!("returned above"),
        }
        self.protected.insert(tick, key.clone());
        // Keep protected within its share: demote its least recent to probation's recent end.
        let cap = (budget as f64 * PROTECTED_SHARE) as u64;
        while self.protected_bytes > cap && self.protected.len() > 1 {
            let (&t, _) = self.protected.iter().next().expect("non-empty");
            let k = self.protected.remove(&t).expect("present");
            let nt = self.next_tick();
            let e = self.entries.get_mut(&k).expect("indexed");
            e.tick = nt;
            e.segment = Segment::Probation;
            self.protected_bytes -= e.size;
            self.probation.insert(nt, k);
        }
        true
    }

    fn pin(&mut self, key: &Key) {
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        match e.segment {
            Segment::Pinned => return,
            Segment::Probation => {
                self.probation.remove(&e.tick);
            }
            Segment::Protected => {
                self.protected.remove(&e.tick);
                self.protected_bytes -= e.size;
            }
        }
        e.segment = Segment::Pinned;
        self.pinned_bytes += e.size;
        self.dirty = true;
    }

    /// Evicts until `bytes` more fit beside what is used and reserved. Evicts nothing when
    /// they cannot fit even after evicting everything evictable.
    fn make_room(&mut self, bytes: u64, budget: u64) -> Result<Vec<Key>, ReserveError> {
        if bytes > budget.saturating_sub(self.pinned_bytes) {
            return Err(ReserveError::TooLarge {
                size: bytes,
                budget: budget.saturating_sub(self.pinned_bytes),
            });
        }
        if self.pinned_bytes + self.reserved + bytes > budget {
            return Err(ReserveError::Busy);
        }
        let mut evicted = Vec::new();
        while self.used + self.reserved + bytes > budget {
            let victim = self
                .probation
                .values()
                .next()
                .or_else(|| self.protected.values().next())
                .cloned();
            let Some(k) = victim else {
                break;
            };
            self.remove(&k);
            self.evictions += 1;
            evicted.push(k);
        }
        Ok(evicted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Key {
        Key {
            kind: ObjectKind::Blob,
            digest: Digest::sha256_of(&[n]),
        }
    }

    fn fill(index: &Arc<DiskIndex>, n: u8, size: u64) -> Vec<Key> {
        let (r, mut evicted) = index.reserve(size).unwrap();
        evicted.extend(r.commit(key(n), size));
        evicted
    }

    #[test]
    fn budget_holds_and_lru_of_probation_goes_first() {
        let idx = DiskIndex::new(100);
        for n in 0..5 {
            assert!(fill(&idx, n, 20).is_empty());
        }
        assert_eq!(idx.usage().used, 100);
        // A hit protects 0; the next fill evicts 1, the oldest unprotected.
        idx.touch(&key(0));
        assert_eq!(fill(&idx, 9, 20), vec![key(1)]);
        assert_eq!(idx.usage().used, 100);
        assert!(idx.contains(&key(0)));
    }

    #[test]
    fn reservations_count_against_the_budget() {
        let idx = DiskIndex::new(100);
        let (a, _) = idx.reserve(60).unwrap();
        assert_eq!(idx.reserve(50).err(), Some(ReserveError::Busy));
        drop(a);
        let (_b, _) = idx.reserve(50).unwrap();
        assert_eq!(idx.usage().reserved, 50);
        assert!(matches!(
            idx.reserve(101),
            Err(ReserveError::TooLarge { .. })
        ));
    }

    #[test]
    fn one_off_scans_do_not_flush_the_hot_set() {
        let idx = DiskIndex::new(100);
        for n in 0..4 {
            fill(&idx, n, 10);
            idx.touch(&key(n));
        }
        // A scan of many cold objects passes through probation only.
        for n in 10..60 {
            fill(&idx, n, 10);
        }
        for n in 0..4 {
            assert!(idx.contains(&key(n)), "hot object {n} survived the scan");
        }
        assert!(idx.usage().used <= 100);
    }

    #[test]
    fn protected_share_is_capped() {
        let idx = DiskIndex::new(100);
        for n in 0..10 {
            fill(&idx, n, 10);
            idx.touch(&key(n));
        }
        let i = idx.lock();
        assert!(i.protected_bytes <= 80, "{}", i.protected_bytes);
        assert_eq!(i.used, 100);
    }

    #[test]
    fn pinned_objects_are_never_evicted_and_count_in_the_budget() {
        let idx = DiskIndex::new(100);
        fill(&idx, 1, 40);
        fill(&idx, 2, 40);
        idx.pin(&[key(1)]).unwrap();
        // Only 60 bytes are evictable space now; 2 goes, 1 stays.
        assert_eq!(fill(&idx, 3, 60), vec![key(2)]);
        assert!(idx.is_pinned(&key(1)));
        assert!(matches!(
            idx.reserve(61),
            Err(ReserveError::TooLarge { .. })
        ));
        assert!(matches!(
            idx.pin(&[key(3), key(9)]),
            Err(PinError::NotCached(_))
        ));
        assert!(matches!(
            DiskIndex::new(50).pin(&[key(1)]),
            Err(PinError::NotCached(_))
        ));
        idx.pin(&[key(3)]).unwrap();
        assert_eq!(idx.usage().pinned, 100);
        assert!(
            idx.reserve(1).is_err(),
            "a fully pinned budget admits nothing"
        );
        let big = DiskIndex::new(100);
        fill(&big, 1, 60);
        fill(&big, 2, 40);
        big.pin(&[key(1)]).unwrap();
        assert!(matches!(big.pin(&[key(2)]), Ok(())));
    }

    #[test]
    fn snapshot_orders_victims_first() {
        let idx = DiskIndex::new(100);
        fill(&idx, 1, 10);
        fill(&idx, 2, 10);
        idx.touch(&key(1));
        let s = idx.snapshot();
        assert_eq!(s, vec![(key(2), false), (key(1), true)]);
        assert!(!idx.is_dirty());
    }
}
