//! Recycled buffers for reads from cached files. A fresh 256 KiB buffer per chunk cost a
//! zero-fill and, because glibc hands blocks that large back to the kernel when they are freed,
//! page faults on every use: a third of the CPU of serving a hot blob. A buffer whose bytes have
//! been sent goes back to a small pool instead, already initialized, and the next read fills it.

use std::sync::Mutex;

use bytes::Bytes;

/// Size of every pooled buffer: the largest read made from a cached file.
pub const BUF_SIZE: usize = super::fill::CHUNK;

/// Most buffers kept for reuse (8 MiB); more are freed when returned.
const POOL_MAX: usize = 32;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer of [`BUF_SIZE`] bytes: a recycled one, or a fresh zeroed one.
pub fn take() -> Vec<u8> {
    POOL.lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop()
        .unwrap_or_else(|| vec![0; BUF_SIZE])
}

/// The first `len` bytes of `buf` as `Bytes`; `buf` returns to the pool when the last clone
/// of them is dropped.
pub fn freeze(buf: Vec<u8>, len: usize) -> Bytes {
    debug_assert!(len <= buf.len());
    Bytes::from_owner(Pooled { buf, len })
}

struct Pooled {
    buf: Vec<u8>,
    len: usize,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.len() == BUF_SIZE {
            let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < POOL_MAX {
                pool.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_after_the_last_clone() {
        let mut buf = take();
        buf[..3].copy_from_slice(b"abc");
        let ptr = buf.as_ptr();
        let b = freeze(buf, 3);
        let c = b.slice(1..);
        assert_eq!(&b[..], b"abc");
        drop(b);
        assert_eq!(&c[..], b"bc");
        drop(c);
        // Another thread may have taken it meanwhile in a parallel test run; look for it.
        let mut taken = Vec::new();
        let mut found = false;
        for _ in 0..POOL_MAX {
            let t = take();
            found |= t.as_ptr() == ptr;
            taken.push(t);
            if found {
                break;
            }
        }
        assert!(found, "the buffer was not recycled");
        assert!(taken.iter().all(|t| t.len() == BUF_SIZE));
    }
}
