//! A node's attributes as ONNX Runtime hands them to the ops: the contract's attribute source
//! (`crate::spec::AttrSource`) over the kernel info (kernel creation) and the shape-inference
//! context, and the type probe that tells an attribute given with the wrong type from an absent one.

use super::api::{api, check, KernelInfo, ShapeContext};
use ort_sys::OrtOpAttrType;
use std::ffi::{c_void, CStr, CString};
use std::ptr;

impl crate::spec::AttrSource for KernelInfo {
    fn int(&self, name: &str) -> Option<i64> {
        let c = CString::new(name).ok()?;
        let mut v = 0i64;
        check(unsafe { (api().KernelInfoGetAttribute_int64)(self.0, c.as_ptr(), &mut v) }).ok().map(|_| v)
    }

    fn float(&self, name: &str) -> Option<f32> {
        let c = CString::new(name).ok()?;
        let mut v = 0f32;
        check(unsafe { (api().KernelInfoGetAttribute_float)(self.0, c.as_ptr(), &mut v) }).ok().map(|_| v)
    }

    fn string(&self, name: &str) -> Option<String> {
        let c = CString::new(name).ok()?;
        let mut len = 0usize;
        check(unsafe { (api().KernelInfoGetAttribute_string)(self.0, c.as_ptr(), ptr::null_mut(), &mut len) }).ok()?;
        let mut buf = vec![0u8; len.max(1)];
        check(unsafe { (api().KernelInfoGetAttribute_string)(self.0, c.as_ptr(), buf.as_mut_ptr().cast(), &mut len) }).ok()?;
        CStr::from_bytes_until_nul(&buf).ok().map(|s| s.to_string_lossy().into_owned())
    }

    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        let c = CString::new(name).ok()?;
        let mut n = 0usize;
        // A size query succeeds for any attribute name ORT finds: only a non-empty list tells.
        check(unsafe { (api().KernelInfoGetAttributeArray_int64)(self.0, c.as_ptr(), ptr::null_mut(), &mut n) }).ok()?;
        if n == 0 {
            return None;
        }
        let mut v = vec![0i64; n];
        check(unsafe { (api().KernelInfoGetAttributeArray_int64)(self.0, c.as_ptr(), v.as_mut_ptr(), &mut n) }).ok()?;
        v.truncate(n);
        Some(v)
    }
}

/// Which ONNX type an attribute was given, as far as these getters can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrKind {
    Int,
    Float,
    Str,
    Ints,
    Floats,
}

impl AttrKind {
    fn name(self) -> &'static str {
        match self {
            AttrKind::Int => "an int",
            AttrKind::Float => "a float",
            AttrKind::Str => "a string",
            AttrKind::Ints => "a list of ints",
            AttrKind::Floats => "a list of floats",
        }
    }

    fn of(default: crate::spec::AttrDefault) -> Self {
        match default {
            crate::spec::AttrDefault::Int(_) => AttrKind::Int,
            crate::spec::AttrDefault::Float(_) => AttrKind::Float,
            crate::spec::AttrDefault::Str(_) => AttrKind::Str,
            crate::spec::AttrDefault::Ints(_) => AttrKind::Ints,
        }
    }
}

/// A node's attributes, probed by name and type (ORT's getters fail on a type mismatch, and the
/// spec's parsers read that as "absent", which would silently apply the default).
pub trait AttrProbe {
    /// Whether attribute `name` is present with type `kind`.
    fn has(&self, name: &str, kind: AttrKind) -> bool;

    /// An error naming the first attribute of `descs` that is present with another type than the
    /// contract's (op `op`).
    fn check_attr_types(&self, op: &str, descs: &[crate::spec::AttrDesc]) -> Result<(), String> {
        const ALL: [AttrKind; 5] = [AttrKind::Int, AttrKind::Float, AttrKind::Str, AttrKind::Ints, AttrKind::Floats];
        for d in descs {
            let want = AttrKind::of(d.default);
            if self.has(d.name, want) {
                continue;
            }
            if let Some(got) = ALL.into_iter().find(|&k| k != want && self.has(d.name, k)) {
                return Err(format!("{op}: attribute '{}' must be {}, got {}", d.name, want.name(), got.name()));
            }
        }
        Ok(())
    }
}

impl AttrProbe for KernelInfo {
    fn has(&self, name: &str, kind: AttrKind) -> bool {
        use crate::spec::AttrSource;
        let Ok(c) = CString::new(name) else { return false };
        match kind {
            AttrKind::Int => self.int(name).is_some(),
            AttrKind::Float => self.float(name).is_some(),
            AttrKind::Str => self.string(name).is_some(),
            AttrKind::Ints => {
                let mut n = 0usize;
                // A size query succeeds for any attribute name ORT finds: only a non-empty list tells.
                check(unsafe { (api().KernelInfoGetAttributeArray_int64)(self.0, c.as_ptr(), ptr::null_mut(), &mut n) }).is_ok() && n > 0
            }
            AttrKind::Floats => {
                let mut n = 0usize;
                // A size query succeeds for any attribute name ORT finds: only a non-empty list tells.
                check(unsafe { (api().KernelInfoGetAttributeArray_float)(self.0, c.as_ptr(), ptr::null_mut(), &mut n) }).is_ok() && n > 0
            }
        }
    }
}

impl ShapeContext {
    fn attr_raw(&self, name: &str, ty: OrtOpAttrType, buf: &mut [u8]) -> Option<usize> {
        let c = CString::new(name).ok()?;
        let mut attr = ptr::null();
        check(unsafe { (api().ShapeInferContext_GetAttribute)(self.0, c.as_ptr(), &mut attr) }).ok()?;
        if attr.is_null() {
            return None;
        }
        let mut len = 0usize;
        let r = check(unsafe { (api().ReadOpAttr)(attr, ty, buf.as_mut_ptr().cast::<c_void>(), buf.len(), &mut len) });
        match r {
            Ok(()) => Some(len),
            // A too-small buffer reports the size it needs.
            Err(_) if len > buf.len() => {
                let mut big = vec![0u8; len];
                check(unsafe { (api().ReadOpAttr)(attr, ty, big.as_mut_ptr().cast::<c_void>(), big.len(), &mut len) }).ok()?;
                buf.iter_mut().zip(big.iter()).for_each(|(a, b)| *a = *b);
                Some(len)
            }
            Err(_) => None,
        }
    }
}

impl AttrProbe for ShapeContext {
    fn has(&self, name: &str, kind: AttrKind) -> bool {
        let ty = match kind {
            AttrKind::Int => OrtOpAttrType::ORT_OP_ATTR_INT,
            AttrKind::Float => OrtOpAttrType::ORT_OP_ATTR_FLOAT,
            AttrKind::Str => OrtOpAttrType::ORT_OP_ATTR_STRING,
            AttrKind::Ints => OrtOpAttrType::ORT_OP_ATTR_INTS,
            AttrKind::Floats => OrtOpAttrType::ORT_OP_ATTR_FLOATS,
        };
        let mut b = [0u8; 64];
        self.attr_raw(name, ty, &mut b).is_some()
    }
}

impl crate::spec::AttrSource for ShapeContext {
    fn int(&self, name: &str) -> Option<i64> {
        let mut b = [0u8; 8];
        self.attr_raw(name, OrtOpAttrType::ORT_OP_ATTR_INT, &mut b).map(|_| i64::from_ne_bytes(b))
    }

    fn float(&self, name: &str) -> Option<f32> {
        let mut b = [0u8; 4];
        self.attr_raw(name, OrtOpAttrType::ORT_OP_ATTR_FLOAT, &mut b).map(|_| f32::from_ne_bytes(b))
    }

    fn string(&self, name: &str) -> Option<String> {
        let mut b = vec![0u8; 256];
        let len = self.attr_raw(name, OrtOpAttrType::ORT_OP_ATTR_STRING, &mut b)?;
        if len > b.len() {
            b = vec![0u8; len];
            self.attr_raw(name, OrtOpAttrType::ORT_OP_ATTR_STRING, &mut b)?;
        }
        b.truncate(len);
        // ORT may or may not count a trailing NUL.
        while b.last() == Some(&0) {
            b.pop();
        }
        Some(String::from_utf8_lossy(&b).into_owned())
    }

    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        let mut b = vec![0u8; 64];
        // ReadOpAttr reports the list's size in bytes; a list longer than the buffer is read again.
        let len = self.attr_raw(name, OrtOpAttrType::ORT_OP_ATTR_INTS, &mut b)?;
        if len > b.len() {
            b = vec![0u8; len];
            self.attr_raw(name, OrtOpAttrType::ORT_OP_ATTR_INTS, &mut b)?;
        }
        Some(b[..len].chunks_exact(8).map(|c| i64::from_ne_bytes(c.try_into().unwrap())).collect())
    }
}
