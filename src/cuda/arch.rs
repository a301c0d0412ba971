//! GPU generations the kernels are built for. A device's compute capability maps to the `Arch`
//! whose native code it runs; which kernels load there, and which the GEMM choice considers, follow
//! from the arches each kernel lists in kernels/manifest.toml.

/// A target of the fatbins (kernels/manifest.toml `nvcc.targets`, plus generations to come).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    /// Ampere (sm_80 code also runs on 8.6 and 8.7)
    Sm80,
    /// Ada
    Sm89,
    /// Hopper with its arch-specific features (wgmma, TMA multicast): compute capability 9.0 only
    Sm90a,
    /// Blackwell data-centre parts (no kernels built for it yet: listed so a device reports what it is)
    Sm100,
}

impl Arch {
    /// The arch whose native code a device of compute capability `cc` runs, if any.
    pub fn from_cc(cc: (i32, i32)) -> Option<Arch> {
        match cc {
            (8, 9) => Some(Arch::Sm89),
            (8, _) => Some(Arch::Sm80),
            (9, 0) => Some(Arch::Sm90a),
            (10, 0) => Some(Arch::Sm100),
            _ => None,
        }
    }

    /// nvcc's name of the arch (`sm_90a`).
    pub const fn name(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm89 => "sm_89",
            Arch::Sm90a => "sm_90a",
            Arch::Sm100 => "sm_100",
        }
    }

    /// The SM version a fatbin entry for it carries (90 for sm_90a).
    pub const fn sm(self) -> u32 {
        match self {
            Arch::Sm80 => 80,
            Arch::Sm89 => 89,
            Arch::Sm90a => 90,
            Arch::Sm100 => 100,
        }
    }

    /// Whether its code uses the arch-specific ("a") features, which run on that exact arch only.
    pub const fn arch_specific(self) -> bool {
        matches!(self, Arch::Sm90a)
    }

    /// Whether the Hopper warpgroup MMA (wgmma) kernels run here.
    pub const fn has_wgmma(self) -> bool {
        matches!(self, Arch::Sm90a)
    }
}

#[cfg(test)]
mod tests {
    use super::Arch;

    #[test]
    fn compute_capabilities_map_to_the_code_they_run() {
        assert_eq!(Arch::from_cc((8, 0)), Some(Arch::Sm80));
        assert_eq!(Arch::from_cc((8, 6)), Some(Arch::Sm80));
        assert_eq!(Arch::from_cc((8, 9)), Some(Arch::Sm89));
        assert_eq!(Arch::from_cc((9, 0)), Some(Arch::Sm90a));
        assert_eq!(Arch::from_cc((10, 0)), Some(Arch::Sm100));
        assert_eq!(Arch::from_cc((7, 5)), None);
        // wgmma exactly where the old test `cc == (9, 0)` said so
        for cc in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)] {
            assert_eq!(Arch::from_cc(cc).is_some_and(Arch::has_wgmma), cc == (9, 0), "{cc:?}");
        }
    }
}

/// Which table of the kernel choice's thresholds a card takes where two cards of one arch were
/// measured apart (src/cuda/forward/selection.rs): the H200's (the default, where most were
/// measured) or the H100's. Keyed by the device's name, as tuned kernel tables are; a card measured
/// on neither takes the default. The H100's was measured on the SXM part (H100 80GB HBM3); the
/// other H100s (PCIe, NVL) take it too, unmeasured; H800, H20 and GH200 take the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Table {
    #[default]
    Default,
    H100,
}

impl Table {
    /// The table for a device named `name` (cuDeviceGetName: "NVIDIA H100 80GB HBM3", ...).
    pub fn for_device(name: &str) -> Table {
        if name.contains("H100") {
            Table::H100
        } else {
            Table::Default
        }
    }
}
