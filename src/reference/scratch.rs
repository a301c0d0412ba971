//! Buffers a kernel keeps from one call to the next. The intermediate activations of a call with
//! many tokens take megabytes: allocated fresh every call, they come back from the allocator as
//! new pages that the kernel faults in and zeroes one by one, about a tenth of the time of the
//! products themselves. A kernel that keeps a `Scratch` pays that once.

/// Reusable f32 buffers.
#[derive(Default)]
pub struct Scratch {
    bufs: Vec<Vec<f32>>,
}

impl Scratch {
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
}
