//! Compiles kernels/*.cu into fatbins and embeds them in the library, and generates the kernel
//! tables from kernels/manifest.toml (the one place the kernel catalogue is kept):
//! - `$OUT_DIR/kernels.rs`: the fatbins (`crate::cuda::images`);
//! - `$OUT_DIR/catalogue.rs`: the GEMM configurations, the entry points and the kernel-choice
//!   thresholds (`crate::cuda::catalogue`);
//! - `$OUT_DIR/kernel_table.py`: the same for the Python host of the GPU tests, committed as
//!   tests/gpu/kernel_table.py (a unit test checks that the two agree).
//!
//! nvcc is found through `NVCC`, `CUDA_HOME`, the project's `.venv-nvcc` (scripts/setup-nvcc.sh)
//! or PATH; its flags and targets come from the manifest. Without nvcc the crate still builds: the
//! GPU path then reports that it was built without kernels. The fatbins are kept between builds
//! while the kernel sources, the flags and nvcc are unchanged (a stamp of them in `$OUT_DIR`).

use std::collections::hash_map::DefaultHasher;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let p = Path::new(&home).join("bin/nvcc");
        if p.exists() {
            return Some(p);
        }
    }
    if let Ok(dirs) = std::fs::read_dir(root.join(".venv-nvcc/lib")) {
        for d in dirs.flatten() {
            let p = d.path().join("site-packages/nvidia/cu13/bin/nvcc");
            if p.exists() {
                return Some(p);
            }
        }
    }
    let which = Command::new("sh").args(["-c", "command -v nvcc"]).output().ok()?;
    let p = String::from_utf8_lossy(&which.stdout).trim().to_string();
    (!p.is_empty()).then(|| PathBuf::from(p))
}

// ---------------------------------------------------------------------------------------------
// The manifest
// ---------------------------------------------------------------------------------------------

struct Gemm {
    variant: String,
    suffix: String,
    doc: String,
    tile: (i64, i64),
    threads: i64,
    smem: i64,
    cluster: i64,
    archs: Vec<String>,
    w_by_tma: bool,
    grouped_a_form: bool,
    types: Vec<String>,
}

struct Manifest {
    flags: Vec<String>,
    /// (arch, gencode)
    targets: Vec<(String, String)>,
    ptx: String,
    modules: Vec<String>,
    /// (module, name template, threads)
    plain: Vec<(String, String, i64)>,
    gemm: Vec<Gemm>,
    /// (name, value) in file order
    selection: Vec<(String, toml::Value)>,
}

fn read_manifest(path: &Path) -> Manifest {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: toml::Table = text.parse().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let bad = |what: &str| -> ! { panic!("kernels/manifest.toml: {what}") };
    let str_of = |v: &toml::Value, what: &str| v.as_str().map(String::from).unwrap_or_else(|| bad(&format!("{what} must be a string")));
    let strs = |v: Option<&toml::Value>, what: &str| -> Vec<String> {
        v.and_then(|v| v.as_array()).unwrap_or_else(|| bad(&format!("{what} must be a list"))).iter().map(|s| str_of(s, what)).collect()
    };
    let int = |t: &toml::Table, k: &str| t.get(k).and_then(|v| v.as_integer()).unwrap_or_else(|| bad(&format!("{k} must be an integer")));
    let nvcc = doc.get("nvcc").and_then(|v| v.as_table()).unwrap_or_else(|| bad("no [nvcc] table"));
    let targets: Vec<(String, String)> = nvcc
        .get("targets")
        .and_then(|v| v.as_array())
        .unwrap_or_else(|| bad("nvcc.targets must be a list"))
        .iter()
        .map(|t| (str_of(&t["arch"], "target arch"), str_of(&t["gencode"], "target gencode")))
        .collect();
    let arch_names: Vec<String> = targets.iter().map(|t| t.0.clone()).collect();
    let tables = |k: &str| -> Vec<toml::Table> {
        doc.get(k).and_then(|v| v.as_array()).unwrap_or_else(|| bad(&format!("no [[{k}]] tables"))).iter().map(|v| v.as_table().unwrap().clone()).collect()
    };
    let modules = strs(doc.get("modules"), "modules");
    let mut plain = Vec::new();
    for t in tables("plain") {
        let module = str_of(&t["module"], "plain.module");
        if !modules.contains(&module) {
            bad(&format!("unknown module '{module}'"));
        }
        for n in strs(t.get("names"), "plain.names") {
            plain.push((module.clone(), n, int(&t, "threads")));
        }
    }
    let gemm = tables("gemm")
        .into_iter()
        .map(|t| {
            let tile = t.get("tile").and_then(|v| v.as_array()).filter(|a| a.len() == 2).unwrap_or_else(|| bad("gemm.tile must be [BM, BN]"));
            let archs = match t.get("archs") {
                Some(v) => strs(Some(v), "gemm.archs"),
                None => arch_names.clone(),
            };
            if let Some(a) = archs.iter().find(|a| !arch_names.contains(a)) {
                bad(&format!("gemm.archs names '{a}', which is not a target"));
            }
            Gemm {
                variant: str_of(&t["variant"], "gemm.variant"),
                suffix: str_of(&t["suffix"], "gemm.suffix"),
                doc: str_of(&t["doc"], "gemm.doc"),
                tile: (tile[0].as_integer().unwrap(), tile[1].as_integer().unwrap()),
                threads: int(&t, "threads"),
                smem: int(&t, "smem"),
                cluster: t.get("cluster").and_then(|v| v.as_integer()).unwrap_or(1),
                archs,
                w_by_tma: t.get("w_by_tma").and_then(|v| v.as_bool()).unwrap_or(false),
                grouped_a_form: t.get("grouped_a_form").and_then(|v| v.as_bool()).unwrap_or(false),
                types: match t.get("types") {
                    Some(v) => strs(Some(v), "gemm.types"),
                    None => vec!["f16".into(), "bf16".into()],
                },
            }
        })
        .collect();
    let selection = doc.get("selection").and_then(|v| v.as_table()).unwrap_or_else(|| bad("no [selection] table"));
    Manifest {
        flags: strs(nvcc.get("flags"), "nvcc.flags"),
        ptx: str_of(nvcc.get("ptx").unwrap_or_else(|| bad("no nvcc.ptx")), "nvcc.ptx"),
        targets,
        modules,
        plain,
        gemm,
        selection: selection.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

impl Manifest {
    /// Every nvcc argument but the input and output: flags, then one -gencode per target and PTX.
    fn nvcc_args(&self) -> Vec<String> {
        let mut a = self.flags.clone();
        a.extend(self.targets.iter().map(|t| format!("-gencode={}", t.1)));
        a.push(format!("-gencode={}", self.ptx));
        a
    }
}

fn arch_variant(a: &str) -> String {
    let mut c = a.chars();
    c.next().map_or(String::new(), |f| f.to_uppercase().chain(c).collect())
}

/// The Rust tables (`crate::cuda::catalogue` includes them).
fn rust_tables(m: &Manifest) -> String {
    let mut s = String::from("// Generated by build.rs from kernels/manifest.toml.\n\n");
    let arches = |v: &[String]| v.iter().map(|a| format!("Arch::{}", arch_variant(a))).collect::<Vec<_>>().join(", ");
    let all: Vec<String> = m.targets.iter().map(|t| t.0.clone()).collect();
    writeln!(s, "/// The arches the fatbins hold native code for.\npub const TARGETS: [Arch; {}] = [{}];\n", all.len(), arches(&all)).unwrap();
    writeln!(s, "/// Kernel modules (kernels/<name>.cu), in load order.\npub const MODULES: [&str; {}] = {:?};\n", m.modules.len(), m.modules).unwrap();
    s.push_str("/// Kernels with a plain launch: (module index, name template, threads); `{i}` stands for each\n/// index type, `{t}` for each element type.\npub const PLAIN: &[(usize, &str, u32)] = &[\n");
    for (module, name, threads) in &m.plain {
        let i = m.modules.iter().position(|x| x == module).unwrap();
        writeln!(s, "    ({i}, {name:?}, {threads}),").unwrap();
    }
    s.push_str("];\n\n/// One grouped-GEMM kernel configuration (the suffix of its entry point).\n");
    s.push_str("#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]\npub enum GemmCfg {\n");
    for g in &m.gemm {
        writeln!(s, "    /// {}\n    {},", g.doc, g.variant).unwrap();
    }
    s.push_str("}\n\nimpl GemmCfg {\n");
    let list = |f: &dyn Fn(&Gemm) -> bool| m.gemm.iter().filter(|g| f(g)).map(|g| format!("GemmCfg::{}", g.variant)).collect::<Vec<_>>();
    let every = list(&|_| true);
    let tc = list(&|g| g.types.iter().any(|t| t != "f32"));
    writeln!(s, "    /// Every configuration, in manifest order.\n    pub const ALL: [GemmCfg; {}] = [{}];", every.len(), every.join(", ")).unwrap();
    writeln!(s, "    /// The tensor-core (f16/bf16) configurations.\n    pub const TENSOR_CORE: [GemmCfg; {}] = [{}];\n", tc.len(), tc.join(", ")).unwrap();
    let method = |s: &mut String, sig: &str, doc: &str, f: &dyn Fn(&Gemm) -> String| {
        writeln!(s, "    /// {doc}\n    pub const fn {sig} {{\n        match self {{").unwrap();
        for g in &m.gemm {
            writeln!(s, "            GemmCfg::{} => {},", g.variant, f(g)).unwrap();
        }
        s.push_str("        }\n    }\n\n");
    };
    method(&mut s, "suffix(self) -> &'static str", "The suffix of its entry points' names.", &|g| format!("{:?}", g.suffix));
    method(&mut s, "tile(self) -> (usize, usize)", "(BM, BN): rows and W rows of one tile.", &|g| format!("({}, {})", g.tile.0, g.tile.1));
    method(&mut s, "threads(self) -> u32", "Threads per block.", &|g| g.threads.to_string());
    method(&mut s, "smem(self) -> u32", "Dynamic shared memory bytes.", &|g| g.smem.to_string());
    method(&mut s, "cluster(self) -> u32", "CTAs per cluster of this configuration's kernels.", &|g| g.cluster.to_string());
    method(&mut s, "archs(self) -> &'static [Arch]", "The arches with native code for it (its body traps elsewhere).", &|g| format!("&[{}]", arches(&g.archs)));
    method(&mut s, "w_by_tma(self) -> bool", "Whether the kernel reads W through a TMA tensor map (an extra kernel parameter).", &|g| g.w_by_tma.to_string());
    method(
        &mut s,
        "has_grouped_a_form(self) -> bool",
        "Whether the kernel has a form for grouped input (`GROUPED_A_SUFFIX`) with A by TMA as well as W.",
        &|g| g.grouped_a_form.to_string(),
    );
    method(&mut s, "types(self) -> &'static [&'static str]", "The element types it has entry points for.", &|g| format!("&{:?}", g.types));
    s.push_str("}\n\n/// The kernel choice's thresholds (see `crate::cuda::forward::selection`).\npub mod thresholds {\n");
    for (k, v) in &m.selection {
        let (ty, val) = match v {
            toml::Value::Float(f) => ("f64", format!("{f:?}")),
            toml::Value::Integer(i) => ("usize", i.to_string()),
            _ => panic!("kernels/manifest.toml: selection.{k} must be a number"),
        };
        writeln!(s, "    pub const {}: {ty} = {val};", k.to_uppercase()).unwrap();
    }
    s.push_str("}\n");
    s
}

/// The Python table (tests/gpu/kernel_table.py).
fn python_table(m: &Manifest) -> String {
    let mut s = String::from(
        "\"\"\"The kernel catalogue for the Python host of the GPU tests (smoe_cuda.py).\n\n\
         Generated by build.rs from kernels/manifest.toml: do not edit. A unit test of the crate checks\n\
         that this file is current; `SCATTERMOE_UPDATE_TABLES=1 cargo test --release --lib catalogue`\n\
         rewrites it.\n\"\"\"\n\n",
    );
    let py_list = |v: Vec<String>| if v.len() == 1 { format!("({:?},)", v[0]) } else { format!("({})", v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(", ")) };
    writeln!(s, "MODULES = {}", py_list(m.modules.clone())).unwrap();
    // every tensor-core entry-point suffix, its grouped-A form included
    let mut forms: Vec<(String, &Gemm, bool)> = Vec::new();
    for g in m.gemm.iter().filter(|g| g.types.iter().any(|t| t != "f32")) {
        forms.push((g.suffix.clone(), g, false));
        if g.grouped_a_form {
            forms.push((format!("{}_ga", g.suffix), g, true));
        }
    }
    s.push_str("# name suffix -> (BM, BN, threads, dynamic smem bytes)\nTC_CFGS = {\n");
    for (name, g, _) in &forms {
        writeln!(s, "    {name:?}: ({}, {}, {}, {}),", g.tile.0, g.tile.1, g.threads, g.smem).unwrap();
    }
    s.push_str("}\n# CTAs per cluster (__cluster_dims__ in the kernel), where more than one\nCLUSTER = {");
    s.push_str(&forms.iter().filter(|f| f.1.cluster > 1).map(|(n, g, _)| format!("{n:?}: {}", g.cluster)).collect::<Vec<_>>().join(", "));
    s.push_str("}\n");
    writeln!(s, "# W through a TMA map (one more parameter)\nTMA_W = {}", py_list(forms.iter().filter(|f| f.1.w_by_tma).map(|f| f.0.clone()).collect())).unwrap();
    writeln!(s, "# grouped input only: A through a TMA map too (one more parameter again)\nGROUPED_A = {}", py_list(forms.iter().filter(|f| f.2).map(|f| f.0.clone()).collect())).unwrap();
    let all: Vec<String> = m.targets.iter().map(|t| t.0.clone()).collect();
    writeln!(s, "# native code for sm90a only (the body traps elsewhere)\nSM90A_ONLY = {}", py_list(forms.iter().filter(|f| f.1.archs != all).map(|f| f.0.clone()).collect())).unwrap();
    for g in m.gemm.iter().filter(|g| g.types.iter().all(|t| t == "f32")) {
        writeln!(s, "F32_CFG = ({}, {}, {}, {})", g.tile.0, g.tile.1, g.threads, g.smem).unwrap();
    }
    s.push_str("# the kernel choice's thresholds (src/cuda/forward/selection.rs)\n");
    for (k, v) in &m.selection {
        let val = match v {
            toml::Value::Float(f) if f.fract() == 0.0 => format!("{}", *f as i64),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Integer(i) => i.to_string(),
            _ => unreachable!(),
        };
        writeln!(s, "{} = {val}", k.to_uppercase()).unwrap();
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

/// A digest of everything the fatbins depend on: nvcc's version, its arguments, every file in
/// kernels/.
fn kernel_stamp(nvcc: &Path, args: &[String], root: &Path) -> String {
    let mut h = DefaultHasher::new();
    let version = Command::new(nvcc).arg("--version").output().map(|o| o.stdout).unwrap_or_default();
    version.hash(&mut h);
    args.hash(&mut h);
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("kernels")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    files.sort();
    for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "cu" || e == "cuh")) {
        f.file_name().hash(&mut h);
        std::fs::read(f).unwrap_or_default().hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "SCATTERMOE_NO_KERNELS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let manifest = read_manifest(&root.join("kernels/manifest.toml"));
    std::fs::write(out.join("catalogue.rs"), rust_tables(&manifest)).unwrap();
    std::fs::write(out.join("kernel_table.py"), python_table(&manifest)).unwrap();

    let mut sources: Vec<PathBuf> = std::fs::read_dir(root.join("kernels"))
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "cu")).collect())
        .unwrap_or_default();
    sources.sort();

    let nvcc = if std::env::var_os("SCATTERMOE_NO_KERNELS").is_some() { None } else { find_nvcc(&root) };
    let mut entries = Vec::new();
    let reason = match &nvcc {
        None => "nvcc was not found (set NVCC or CUDA_HOME, or run scripts/setup-nvcc.sh)".to_string(),
        Some(nvcc) => {
            let args = manifest.nvcc_args();
            let stamp_path = out.join("kernels.stamp");
            let stamp = kernel_stamp(nvcc, &args, &root);
            let fatbin = |name: &str| out.join(format!("{name}.fatbin"));
            let names: Vec<String> = sources.iter().map(|s| s.file_stem().unwrap().to_string_lossy().into_owned()).collect();
            let current = std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) && names.iter().all(|n| fatbin(n).exists());
            if !current {
                let _ = std::fs::remove_file(&stamp_path);
                // One nvcc per file, in parallel: grouped_gemm.cu dominates.
                let jobs: Vec<_> = sources
                    .iter()
                    .zip(&names)
                    .map(|(src, name)| {
                        let child = Command::new(nvcc)
                            .arg("-fatbin")
                            .args(&args)
                            .arg(format!("-I{}", root.join("kernels").display()))
                            .arg(src)
                            .arg("-o")
                            .arg(fatbin(name))
                            .spawn()
                            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
                        (name, child)
                    })
                    .collect();
                for (name, mut child) in jobs {
                    let status = child.wait().expect("nvcc");
                    if !status.success() {
                        panic!("nvcc failed on kernels/{name}.cu ({status})");
                    }
                }
                std::fs::write(&stamp_path, &stamp).unwrap();
            }
            entries = names.iter().map(|n| (n.clone(), fatbin(n))).collect();
            String::new()
        }
    };
    if !reason.is_empty() {
        println!("cargo:warning=scattermoe: building without CUDA kernels: {reason}");
    }

    let mut code = String::from("// Generated by build.rs.\n");
    code.push_str(&format!("pub const NO_KERNELS_REASON: &str = {reason:?};\n"));
    code.push_str("pub const FATBINS: &[(&str, &[u8])] = &[\n");
    for (name, dst) in &entries {
        code.push_str(&format!("    ({name:?}, include_bytes!({:?})),\n", dst.display().to_string()));
    }
    code.push_str("];\n");
    std::fs::write(out.join("kernels.rs"), code).unwrap();
}
