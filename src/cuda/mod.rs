//! The GPU path: CUDA kernels compiled by build.rs from kernels/*.cu and embedded here, the
//! driver (loaded at run time: no GPU or driver is needed to load the library) and the forward
//! passes that launch the kernels on a caller's stream.

pub mod checks;
pub mod driver;
pub mod forward;

/// The embedded fatbins, one per kernels/*.cu file (empty when built without nvcc).
pub mod images {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The fatbin compiled from `kernels/<name>.cu`, or why there is none.
pub fn image(name: &str) -> Result<&'static [u8], String> {
    if images::FATBINS.is_empty() {
        return Err(format!("scattermoe was built without CUDA kernels: {}", images::NO_KERNELS_REASON));
    }
    images::FATBINS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| *b)
        .ok_or_else(|| format!("no kernel image named '{name}' (have: {:?})", images::FATBINS.iter().map(|e| e.0).collect::<Vec<_>>()))
}

#[cfg(test)]
mod tests {
    /// Every kernels/*.cu file compiled into a fatbin holding native code for each target. The test
    /// command installs nvcc, so this runs in CI; a plain `cargo test` without nvcc skips it.
    #[test]
    fn every_kernel_file_is_compiled_for_every_target() {
        if super::images::FATBINS.is_empty() {
            eprintln!("skipped: built without CUDA kernels ({})", super::images::NO_KERNELS_REASON);
            return;
        }
        let mut sources: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels"))
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".cu")).map(String::from))
            .collect();
        sources.sort();
        let mut names: Vec<String> = super::images::FATBINS.iter().map(|e| e.0.to_string()).collect();
        names.sort();
        assert_eq!(names, sources);
        for (name, bytes) in super::images::FATBINS {
            // A fatbin starts with its magic 0xBA55ED50 (little endian).
            assert_eq!(&bytes[..4], &[0x50, 0xed, 0x55, 0xba], "{name}: not a fatbin");
            let text = String::from_utf8_lossy(bytes);
            for arch in ["sm_80", "sm_89", "sm_90a"] {
                assert!(text.contains(arch) || bytes.windows(arch.len()).any(|w| w == arch.as_bytes()), "{name}: no {arch} code");
            }
        }
    }
}
