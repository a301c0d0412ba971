//! The GPU path: CUDA kernels compiled by build.rs from kernels/*.cu and embedded here, the
//! driver (loaded at run time: no GPU or driver is needed to load the library) and the forward
//! passes that launch the kernels on a caller's stream.

pub mod arch;
pub mod catalogue;
pub mod checks;
pub mod driver;
pub mod forward;
pub mod ops;
pub mod tensor_map;

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
            let entries = fatbin_entries(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            // native code for every target of kernels/manifest.toml, with the arch-specific
            // features (wgmma) where the target has them
            for arch in super::catalogue::TARGETS {
                let found = entries.iter().any(|e| e.elf && e.sm == arch.sm() && e.arch_specific == arch.arch_specific());
                assert!(found, "{name}: no {} code in {entries:?}", arch.name());
            }
            // PTX for the newest (compute_90a)
            assert!(entries.iter().any(|e| !e.elf && e.sm == 90 && e.arch_specific), "{name}: no compute_90a PTX in {entries:?}");
        }
    }

    #[derive(Debug)]
    struct Entry {
        elf: bool,
        sm: u32,
        arch_specific: bool,
    }

    /// The entries of a fatbin container as nvcc 12/13 writes it. Its entries may be compressed, so
    /// their contents cannot be searched for the arch name; their headers say it:
    /// container header: magic 0xBA55ED50 (u32), version (u16), header size (u16), payload size (u64);
    /// entry header: kind (u16 at 0: 1 PTX, 2 ELF), header size (u32 at 4), padded payload size
    /// (u64 at 8), SM version (u32 at 28, e.g. 90), flags (u32 at 40: 0x8000 compressed,
    /// 0x100000 arch-specific "a" features).
    fn fatbin_entries(b: &[u8]) -> Result<Vec<Entry>, String> {
        let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes(s.try_into().unwrap())).ok_or("truncated");
        let u32_at = |o: usize| b.get(o..o + 4).map(|s| u32::from_le_bytes(s.try_into().unwrap())).ok_or("truncated");
        let u64_at = |o: usize| b.get(o..o + 8).map(|s| u64::from_le_bytes(s.try_into().unwrap())).ok_or("truncated");
        if u32_at(0)? != 0xBA55_ED50 {
            return Err("not a fatbin".into());
        }
        let start = u16_at(6)? as usize;
        let end = start + u64_at(8)? as usize;
        let (mut off, mut out) = (start, Vec::new());
        while off < end {
            let kind = u16_at(off)?;
            out.push(Entry { elf: kind == 2, sm: u32_at(off + 28)?, arch_specific: u32_at(off + 40)? & 0x10_0000 != 0 });
            let step = u32_at(off + 4)? as usize + u64_at(off + 8)? as usize;
            if step == 0 {
                return Err(format!("empty entry at byte {off}"));
            }
            off += step;
        }
        Ok(out)
    }
}
