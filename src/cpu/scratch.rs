//! Buffers kept from one call to the next. The intermediate activations of a call with many
//! tokens take megabytes: allocated fresh every call, they come back from the allocator as new
//! pages that the call faults in and zeroes one by one, a cost that shows next to the products
//! themselves at large token counts (`bench/cpu_bench.py` measures the layer). Calls that reuse a
//! `Scratch` pay that once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

/// Reusable f32 buffers.
#[derive(Default)]
pub struct Scratch {
    bufs: Vec<Vec<f32>>,
}

impl Scratch {
    pub const fn new() -> Self {
        Scratch { bufs: Vec::new() }
    }

    /// `N` buffers of lengths `lens`. They hold whatever an earlier call left in them: callers
    /// write every value before they read it.
    pub fn buffers<const N: usize>(&mut self, lens: [usize; N]) -> [&mut [f32]; N] {
        if self.bufs.len() < N {
            self.bufs.resize_with(N, Vec::new);
        }
        for (b, &n) in self.bufs.iter_mut().zip(&lens) {
            if b.len() < n {
                // Only the new tail is written; grown buffers need no clearing either.
                b.resize(n, 0.0);
            }
        }
        let mut bufs = self.bufs.iter_mut();
        std::array::from_fn(|i| &mut bufs.next().expect("N buffers exist")[..lens[i]])
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bufs.iter().map(|b| b.capacity() * 4).sum()
    }

    /// Frees everything when more than `bytes` are held: a kernel keeps the buffers of ordinary
    /// calls, not those of one huge call.
    pub fn trim(&mut self, bytes: usize) {
        if self.bytes() > bytes {
            self.bufs = Vec::new();
        }
    }
}

/// One [`Scratch`] shared by the kernels that hold a [`ScratchUser`] of it. ONNX Runtime's
/// sequential executor runs one node at a time, so the MoE layers of a model take turns with one
/// set of buffers instead of each keeping its own; the buffers are freed when the last user goes.
pub struct SharedScratch {
    cell: Mutex<Scratch>,
    users: AtomicUsize,
}

/// A kernel's claim on a [`SharedScratch`]: while one exists, the buffers are kept.
pub struct ScratchUser(&'static SharedScratch);

impl SharedScratch {
    pub const fn new() -> Self {
        SharedScratch { cell: Mutex::new(Scratch::new()), users: AtomicUsize::new(0) }
    }

    pub fn user(&'static self) -> ScratchUser {
        self.users.fetch_add(1, Ordering::AcqRel);
        ScratchUser(self)
    }

    fn lock(&self) -> MutexGuard<'_, Scratch> {
        // A panic in an earlier call leaves nothing to distrust: buffers are written before read.
        self.cell.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` with the shared buffers, or with fresh ones while another call holds them (nodes
    /// of parallel executors or of concurrent runs); afterwards keeps at most `keep` bytes.
    pub fn with<R>(&self, keep: usize, f: impl FnOnce(&mut Scratch) -> R) -> R {
        let mut held = match self.cell.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return f(&mut Scratch::new()),
        };
        let r = f(&mut held);
        held.trim(keep);
        r
    }
}

impl Default for SharedScratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ScratchUser {
    fn drop(&mut self) {
        if self.0.users.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last user: free the buffers (a kernel created meanwhile finds them empty).
            *self.0.lock() = Scratch::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_trimmed() {
        let mut s = Scratch::default();
        let [a, b] = s.buffers([3, 5]);
        assert_eq!((a.len(), b.len()), (3, 5));
        a[0] = 7.0;
        let p = a.as_ptr();
        let [a, b] = s.buffers([2, 4]);
        assert_eq!((a.as_ptr(), a[0], b.len()), (p, 7.0, 4));
        let held = s.bytes();
        assert!(held >= 32);
        s.trim(held);
        assert_eq!(s.bytes(), held);
        s.trim(held - 1);
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn shared_buffers_live_while_a_user_does() {
        static SHARED: SharedScratch = SharedScratch::new();
        let (a, b) = (SHARED.user(), SHARED.user());
        SHARED.with(1 << 20, |s| s.buffers([100]).len());
        assert!(SHARED.lock().bytes() >= 400);
        // a second call while the first holds the buffers gets fresh ones
        SHARED.with(1 << 20, |s| SHARED.with(1 << 20, |inner| assert_eq!((s.bytes() >= 400, inner.bytes()), (true, 0))));
        drop(a);
        assert!(SHARED.lock().bytes() >= 400);
        drop(b);
        assert_eq!(SHARED.lock().bytes(), 0);
    }
}
