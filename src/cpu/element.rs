//! Element types as the CPU code sees them: stored as `T`, computed in f32.

use half::{bf16, f16};

/// A storage element type of the ops (`T` in the op contract). Arithmetic happens in f32.
pub trait Element: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// `src` as f32: borrowed when it already is f32, converted otherwise.
pub fn as_f32<E: Element>(src: &[E]) -> std::borrow::Cow<'_, [f32]> {
    if std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>() {
        // SAFETY: E is f32 (same type id), so the slice is a [f32] of the same length.
        std::borrow::Cow::Borrowed(unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<f32>(), src.len()) })
    } else {
        std::borrow::Cow::Owned(src.iter().map(|v| v.to_f32()).collect())
    }
}

/// Routing indices as the caller holds them (int32 or int64).
#[derive(Clone, Copy)]
pub enum Indices<'a> {
    I32(&'a [i32]),
    I64(&'a [i64]),
}

impl Indices<'_> {
    #[inline(always)]
    pub fn get(&self, i: usize) -> i64 {
        match self {
            Indices::I32(s) => s[i] as i64,
            Indices::I64(s) => s[i],
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Indices::I32(s) => s.len(),
            Indices::I64(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
