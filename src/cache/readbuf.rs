//! Recycled buffers for reads from cached files. A fresh 256 KiB buffer per chunk cost a
//! zero-fill and, because glibc hands blocks that large back to the kernel when they are freed,
//! page faults on every use: a third of the CPU of serving a hot blob. A buffer whose bytes have
//! been sent goes back to a small pool instead, already initialized, and the next read fills it.
//!
//! Architecture: docs/ARCHITECTURE.md, "Cache".

use std::sync::Mutex;

use bytes::Bytes;

/// Size of every pooled buffer: the largest read made from a cached file.
pub const BUF_SIZE: usize = 256 * 1024;

/// Most buffers kept for reuse (8 MiB); more are freed when returned.
const POOL_MAX: usize = 32;

static POOL: Pool = Pool::new();

/// A buffer of [`BUF_SIZE`] bytes: a recycled one, or a fresh zeroed one.
pub fn take() -> Vec<u8> {
    POOL.take()
}

/// Returns a buffer from [`take`] that was not used after all.
pub fn give_back(buf: Vec<u8>) {
    POOL.give_back(buf)
}

/// The first `len` bytes of `buf` as `Bytes`; `buf` returns to the pool when the last clone
/// of them is dropped.
pub fn freeze(buf: Vec<u8>, len: usize) -> Bytes {
    POOL.freeze(buf, len)
}

struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            free: Mutex::new(Vec::new()),
        }
    }

    fn take(&self) -> Vec<u8> {
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_else(|| vec![0; BUF_SIZE])
    }

    fn freeze(&'static self, buf: Vec<u8>, len: usize) -> Bytes {
        debug_assert!(len <= buf.len());
        Bytes::from_owner(Pooled {
            buf,
            len,
            pool: self,
        })
    }

    fn give_back(&self, buf: Vec<u8>) {
        if buf.len() == BUF_SIZE {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            if free.len() < POOL_MAX {
                free.push(buf);
            }
        }
    }
}

struct Pooled {
    buf: Vec<u8>,
    len: usize,
    pool: &'static Pool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> &'static Pool {
        Box::leak(Box::new(Pool::new()))
    }

    #[test]
    fn buffers_come_back_after_the_last_clone() {
        let pool = pool();
        let mut buf = pool.take();
        assert_eq!(buf.len(), BUF_SIZE);
        buf[..3].copy_from_slice(b"abc");
        let ptr = buf.as_ptr();
        let b = pool.freeze(buf, 3);
        let c = b.slice(1..);
        assert_eq!(&b[..], b"abc");
        drop(b);
        assert_eq!(&c[..], b"bc");
        assert!(
            pool.free.lock().unwrap().is_empty(),
            "returned while still in use"
        );
        drop(c);
        assert_eq!(
            pool.free.lock().unwrap().len(),
            1,
            "the buffer was not returned"
        );
        let again = pool.take();
        assert_eq!(again.as_ptr(), ptr, "the buffer was not recycled");
    }

    #[test]
    fn the_pool_keeps_at_most_pool_max() {
        let pool = pool();
        let held: Vec<Bytes> = (0..POOL_MAX + 5)
            .map(|_| pool.freeze(pool.take(), 1))
            .collect();
        drop(held);
        assert_eq!(pool.free.lock().unwrap().len(), POOL_MAX);
    }
}
