//! Compiles kernels/*.cu into fatbins and embeds them in the library, and generates everything
//! the kernel catalogue, kernels/manifest.toml, describes (the one place it is kept):
//! - `$OUT_DIR/kernels-generated/`: the headers the kernel sources include: `<module>_entries.cuh`,
//!   the entry points (one invocation of the module's entry macro per entry point, at the end of
//!   kernels/<module>.cu), and `activations.cuh`, the `SMOE_ACT_*` codes (kernels/common.cuh).
//!   The fatbins are compiled against these; the same files are committed as kernels/generated/
//!   for scripts/gpu/build_kernels.sh, which compiles without cargo;
//! - `$OUT_DIR/kernels.rs`: the fatbins (`crate::cuda::images`);
//! - `$OUT_DIR/catalogue.rs`: the GEMM configurations, the entry points, the activation codes and
//!   the kernel-choice thresholds (`crate::cuda::catalogue`);
//! - `$OUT_DIR/kernel_table.py`: the same for the Python host of the GPU tests, committed as
//!   tests/gpu/kernel_table.py.
//!
//! A unit test (`crate::cuda::catalogue`) checks that the committed copies are current.
//!
//! nvcc is found through `NVCC`, `CUDA_HOME`, the project's `.venv-nvcc` (scripts/setup-nvcc.sh)
//! or PATH; its flags and targets come from the manifest. Without nvcc the crate still builds: the
//! GPU path then reports that it was built without kernels. The fatbins are kept between builds
//! while the kernel sources, the generated headers, the flags and nvcc are unchanged (a stamp of
//! them in `$OUT_DIR`).

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

/// How a GEMM configuration is computed: the kernel template of kernels/grouped_gemm.cu (the wgmma
/// forms: gemm_hopper_ws.cuh) and its
/// parameters (the manifest's `kernel` and the keys that go with it).
enum Body {
    /// `tc_gemm` (mma.sync)
    Tc { block_k: i64, warp_tile: (i64, i64), stages: i64, min_blocks: i64 },
    /// `ws_gemm` (Hopper wgmma, warp-specialised)
    Ws { stages: i64 },
    /// `f32_gemm` (SIMT)
    F32,
    /// `skinny_gemm` (kernels/skinny_gemm.cu: W streamed into registers, few rows per expert):
    /// min_blocks and unroll (k-steps in flight) for 16-bit W, and for the quantized forms (one
    /// unroll per format of `[quant].formats`, in that order)
    Skinny { min_blocks: i64, unroll: i64, quant_min_blocks: i64, quant_unroll: Vec<i64> },
}

impl Body {
    /// The module (kernels/<module>.cu) of a configuration's 16-bit and quantized entry points.
    fn modules(&self) -> (&'static str, &'static str) {
        match self {
            Body::Skinny { .. } => ("skinny_gemm", "skinny_gemm"),
            // the wgmma kernel's forms (one template, gemm_hopper_ws.cuh) in two modules of their own
            Body::Ws { .. } => ("grouped_gemm_ws", "quant_gemm_ws"),
            _ => ("grouped_gemm", "quant_gemm"),
        }
    }
}

struct Gemm {
    variant: String,
    suffix: String,
    doc: String,
    body: Body,
    tile: (i64, i64),
    threads: i64,
    smem: i64,
    cluster: i64,
    archs: Vec<String>,
    w_by_tma: bool,
    grouped_a_form: bool,
    types: Vec<String>,
    /// (format, dynamic smem bytes) of its quantized-weight forms (kernels/quant_gemm.cu, or
    /// kernels/skinny_gemm.cu for skinny_gemm): tc_gemm and skinny_gemm only
    quant: Vec<(String, i64)>,
}

/// A kernel with a plain launch (`[[plain]]`).
struct Plain {
    module: String,
    /// the name, with `{i}` or `{t}` standing for each index or element type
    name: String,
    /// the module's macro that defines it
    entry: String,
    threads: i64,
    /// for a `{t}` name: the element types it exists for (absent: every one)
    types: Option<Vec<String>>,
}

struct Manifest {
    flags: Vec<String>,
    /// (arch, gencode)
    targets: Vec<(String, String)>,
    ptx: String,
    modules: Vec<String>,
    /// the activation names; the code is the position
    activations: Vec<String>,
    /// (name, C type) of the index and element types
    index_types: Vec<(String, String)>,
    elem_types: Vec<(String, String)>,
    /// (name, C type) of the quantized weight formats (`[quant].formats`)
    quant_formats: Vec<(String, String)>,
    plain: Vec<Plain>,
    gemm: Vec<Gemm>,
    /// (name, value) in file order
    selection: Vec<(String, toml::Value)>,
}

fn bad(what: &str) -> ! {
    panic!("kernels/manifest.toml: {what}")
}

fn str_of(v: &toml::Value, what: &str) -> String {
    v.as_str().map(String::from).unwrap_or_else(|| bad(&format!("{what} must be a string")))
}

fn strs(v: Option<&toml::Value>, what: &str) -> Vec<String> {
    v.and_then(|v| v.as_array()).unwrap_or_else(|| bad(&format!("{what} must be a list"))).iter().map(|s| str_of(s, what)).collect()
}

fn req<'a>(t: &'a toml::Table, k: &str, what: &str) -> &'a toml::Value {
    t.get(k).unwrap_or_else(|| bad(&format!("{what}: no {k}")))
}

fn int(t: &toml::Table, k: &str, what: &str) -> i64 {
    t.get(k).and_then(|v| v.as_integer()).unwrap_or_else(|| bad(&format!("{what}.{k} must be an integer")))
}

fn pair(t: &toml::Table, k: &str, what: &str) -> (i64, i64) {
    let a = t.get(k).and_then(|v| v.as_array()).filter(|a| a.len() == 2 && a.iter().all(|x| x.is_integer()));
    let a = a.unwrap_or_else(|| bad(&format!("{what}.{k} must be two integers")));
    (a[0].as_integer().unwrap(), a[1].as_integer().unwrap())
}

/// Refuses keys a table does not take (a misspelt key would otherwise be a silent default).
fn known_keys(t: &toml::Table, keys: &[&str], what: &str) {
    if let Some(k) = t.keys().find(|k| !keys.contains(&k.as_str())) {
        bad(&format!("{what}: unknown key '{k}' (it takes {})", keys.join(", ")));
    }
}

/// `[{ name, c }, ...]` -> (name, C type)
fn type_list(v: Option<&toml::Value>, what: &str) -> Vec<(String, String)> {
    let list = v.and_then(|v| v.as_array()).unwrap_or_else(|| bad(&format!("{what} must be a list of {{ name, c }}")));
    list.iter()
        .map(|e| {
            let e = e.as_table().unwrap_or_else(|| bad(&format!("{what} must be a list of {{ name, c }}")));
            known_keys(e, &["name", "c"], what);
            (str_of(req(e, "name", what), what), str_of(req(e, "c", what), what))
        })
        .collect()
}

fn read_gemm(t: &toml::Table, arch_names: &[String], elem_types: &[(String, String)], formats: &[(String, String)]) -> Gemm {
    let variant = str_of(t.get("variant").unwrap_or_else(|| bad("a [[gemm]] has no variant")), "gemm.variant");
    let what = format!("gemm {variant}");
    let common = ["variant", "suffix", "doc", "kernel", "tile", "threads", "smem", "cluster", "archs", "w_by_tma", "grouped_a_form", "types", "quant"];
    // per format of [quant].formats: `t.<k> = { <format> = <integer>, ... }`, every format
    let per_format = |k: &str| -> Vec<i64> {
        let q = t.get(k).and_then(|v| v.as_table()).unwrap_or_else(|| bad(&format!("gemm {variant}.{k} must be a table {{ <format> = <integer> }}")));
        if let Some(x) = q.keys().find(|x| !formats.iter().any(|f| &f.0 == *x)) {
            bad(&format!("gemm {variant}.{k} names '{x}', which is not a format of [quant].formats"));
        }
        formats.iter().map(|(f, _)| int(q, f, &format!("gemm {variant}.{k}"))).collect()
    };
    let with = |extra: &[&'static str]| -> Vec<&str> { common.iter().chain(extra).copied().collect() };
    let kernel = str_of(req(t, "kernel", &what), "gemm.kernel");
    let body = match kernel.as_str() {
        "tc_gemm" => {
            known_keys(t, &with(&["block_k", "warp_tile", "stages", "min_blocks"]), &what);
            Body::Tc {
                block_k: int(t, "block_k", &what),
                warp_tile: pair(t, "warp_tile", &what),
                stages: int(t, "stages", &what),
                min_blocks: int(t, "min_blocks", &what),
            }
        }
        "ws_gemm" => {
            known_keys(t, &with(&["stages"]), &what);
            Body::Ws { stages: int(t, "stages", &what) }
        }
        "f32_gemm" => {
            known_keys(t, &with(&[]), &what);
            Body::F32
        }
        "skinny_gemm" => {
            known_keys(t, &with(&["min_blocks", "unroll", "quant_min_blocks", "quant_unroll"]), &what);
            let quant = t.contains_key("quant");
            Body::Skinny {
                min_blocks: int(t, "min_blocks", &what),
                unroll: int(t, "unroll", &what),
                quant_min_blocks: if quant { int(t, "quant_min_blocks", &what) } else { 0 },
                quant_unroll: if quant { per_format("quant_unroll") } else { vec![] },
            }
        }
        k => bad(&format!("{what}: unknown kernel '{k}' (tc_gemm, ws_gemm, f32_gemm or skinny_gemm)")),
    };
    let archs = match t.get("archs") {
        Some(v) => strs(Some(v), "gemm.archs"),
        None => arch_names.to_vec(),
    };
    if let Some(a) = archs.iter().find(|a| !arch_names.contains(a)) {
        bad(&format!("{what}: archs names '{a}', which is not a target"));
    }
    let flag = |k: &str| t.get(k).map(|v| v.as_bool().unwrap_or_else(|| bad(&format!("{what}.{k} must be true or false")))).unwrap_or(false);
    let types = match t.get("types") {
        Some(v) => strs(Some(v), "gemm.types"),
        None => vec!["f16".into(), "bf16".into()],
    };
    if let Some(x) = types.iter().find(|x| !elem_types.iter().any(|e| &e.0 == *x)) {
        bad(&format!("{what}: types names '{x}', which is not an element type of [types]"));
    }
    // quant = { <format> = <smem>, ... }: every format of [quant].formats, in that order
    let quant: Vec<(String, i64)> = match t.get("quant") {
        None => vec![],
        Some(_) => formats.iter().map(|f| f.0.clone()).zip(per_format("quant")).collect(),
    };
    if !quant.is_empty() && !matches!(body, Body::Tc { .. } | Body::Skinny { .. } | Body::Ws { .. }) {
        bad(&format!("{what}: quant needs kernel = \"tc_gemm\" (kernels/quant_gemm.cu is its quantized form), \"ws_gemm\" or \"skinny_gemm\""));
    }
    let g = Gemm {
        suffix: str_of(req(t, "suffix", &what), "gemm.suffix"),
        doc: str_of(req(t, "doc", &what), "gemm.doc"),
        body,
        tile: pair(t, "tile", &what),
        threads: int(t, "threads", &what),
        smem: int(t, "smem", &what),
        cluster: t.get("cluster").map(|_| int(t, "cluster", &what)).unwrap_or(1),
        archs,
        w_by_tma: flag("w_by_tma"),
        grouped_a_form: flag("grouped_a_form"),
        types,
        quant,
        variant,
    };
    // The forms the entry macros of kernels/grouped_gemm.cu and grouped_gemm_ws.cu have (see `gemm_entries`).
    let tma_ws = matches!(g.body, Body::Ws { .. }) && g.w_by_tma;
    if g.w_by_tma && !matches!(g.body, Body::Ws { .. }) {
        bad(&format!("{what}: w_by_tma needs kernel = \"ws_gemm\""));
    }
    if !(g.cluster == 1 || (g.cluster == 2 && tma_ws)) {
        bad(&format!("{what}: cluster must be 1, or 2 for a ws_gemm with w_by_tma (the CTA pair sharing W)"));
    }
    if !g.quant.is_empty() && tma_ws {
        bad(&format!("{what}: quant on a ws_gemm needs W by cp.async (no w_by_tma): its producer converts W"));
    }
    if g.grouped_a_form && !tma_ws {
        bad(&format!("{what}: grouped_a_form needs a ws_gemm with w_by_tma"));
    }
    g
}

fn read_manifest(path: &Path) -> Manifest {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: toml::Table = text.parse().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
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
    let types = doc.get("types").and_then(|v| v.as_table()).unwrap_or_else(|| bad("no [types] table"));
    let index_types = type_list(types.get("index"), "types.index");
    let elem_types = type_list(types.get("elem"), "types.elem");
    let mut plain = Vec::new();
    for t in tables("plain") {
        let name = str_of(t.get("name").unwrap_or_else(|| bad("a [[plain]] has no name")), "plain.name");
        known_keys(&t, &["module", "name", "entry", "threads", "types"], &name);
        let module = str_of(req(&t, "module", &name), "plain.module");
        if !modules.contains(&module) {
            bad(&format!("{name}: unknown module '{module}'"));
        }
        if name.contains("{i}") && name.contains("{t}") {
            bad(&format!("{name}: one placeholder per name, {{i}} or {{t}}"));
        }
        let entry = str_of(req(&t, "entry", &name), "plain.entry");
        let types = t.get("types").map(|v| strs(Some(v), &format!("{name}.types")));
        if let Some(ts) = &types {
            if !name.contains("{t}") {
                bad(&format!("{name}: types is for a name with {{t}}"));
            }
            if let Some(u) = ts.iter().find(|x| !elem_types.iter().any(|e| &e.0 == *x)) {
                bad(&format!("{name}: unknown element type '{u}'"));
            }
        }
        plain.push(Plain { module, threads: int(&t, "threads", &name), name, entry, types });
    }
    let quant = doc.get("quant").and_then(|v| v.as_table()).unwrap_or_else(|| bad("no [quant] table"));
    let quant_formats = type_list(quant.get("formats"), "quant.formats");
    let gemm = tables("gemm").iter().map(|t| read_gemm(t, &arch_names, &elem_types, &quant_formats)).collect();
    let activations = strs(doc.get("activations"), "activations");
    if activations.first().map(String::as_str) != Some("none") {
        bad("activations must start with \"none\" (code 0, the identity)");
    }
    for (i, a) in activations.iter().enumerate() {
        if !a.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') || activations[..i].contains(a) {
            bad(&format!("activations: '{a}' must be a snake_case name, listed once"));
        }
    }
    let selection = doc.get("selection").and_then(|v| v.as_table()).unwrap_or_else(|| bad("no [selection] table"));
    Manifest {
        flags: strs(nvcc.get("flags"), "nvcc.flags"),
        ptx: str_of(nvcc.get("ptx").unwrap_or_else(|| bad("no nvcc.ptx")), "nvcc.ptx"),
        targets,
        modules,
        activations,
        index_types,
        elem_types,
        quant_formats,
        plain,
        gemm,
        selection: selection.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

/// The name suffix of a GEMM's form for grouped input that reads A through TMA too.
const GROUPED_A_SUFFIX: &str = "_ga";

/// One entry point: how the driver loads it, and the line of the generated header that defines it.
struct EntryPoint {
    module: usize,
    name: String,
    threads: i64,
    smem: i64,
    cluster: i64,
    tma: bool,
    archs: Vec<String>,
    /// its invocation of the module's entry macro
    def: String,
    /// the manifest table it comes from (a comment above its group in the header)
    about: String,
    /// a `[[plain]]` kernel (not a GEMM)
    plain: bool,
}

impl Manifest {
    /// Every nvcc argument but the input and output: flags, then one -gencode per target and PTX.
    fn nvcc_args(&self) -> Vec<String> {
        let mut a = self.flags.clone();
        a.extend(self.targets.iter().map(|t| format!("-gencode={}", t.1)));
        a.push(format!("-gencode={}", self.ptx));
        a
    }

    fn module_index(&self, name: &str) -> usize {
        self.modules.iter().position(|m| m == name).unwrap_or_else(|| bad(&format!("modules must list '{name}'")))
    }

    /// Every entry point, in manifest order: each plain kernel over the types its placeholder
    /// stands for, then each GEMM configuration over its types (a grouped-A form after its base).
    fn entry_points(&self) -> Vec<EntryPoint> {
        let all: Vec<String> = self.targets.iter().map(|t| t.0.clone()).collect();
        let mut v = Vec::new();
        for p in &self.plain {
            let over = |ph: &str, types: &[(String, String)]| types.iter().map(|(n, c)| (p.name.replace(ph, n), Some(c.clone()))).collect();
            let names: Vec<(String, Option<String>)> = if p.name.contains("{i}") {
                over("{i}", &self.index_types)
            } else if p.name.contains("{t}") {
                let ts: Vec<(String, String)> = self.elem_types.iter().filter(|e| p.types.as_ref().is_none_or(|ts| ts.contains(&e.0))).cloned().collect();
                over("{t}", &ts)
            } else {
                vec![(p.name.clone(), None)]
            };
            for (name, c) in names {
                let def = match c {
                    Some(c) => format!("{}({name}, {c}, {})", p.entry, p.threads),
                    None => format!("{}({name}, {})", p.entry, p.threads),
                };
                let module = self.module_index(&p.module);
                v.push(EntryPoint {
                    module,
                    name,
                    threads: p.threads,
                    smem: 0,
                    cluster: 1,
                    tma: false,
                    archs: all.clone(),
                    def,
                    about: p.name.clone(),
                    plain: true,
                });
            }
        }
        for g in &self.gemm {
            let module = self.module_index(g.body.modules().0);
            for t in &g.types {
                let c = &self.elem_types.iter().find(|e| &e.0 == t).unwrap().1;
                // the one configuration of its type is named by the type alone
                let name = if &g.suffix == t { format!("scattermoe_gemm_{t}") } else { format!("scattermoe_gemm_{t}_{}", g.suffix) };
                for (name, def) in gemm_entries(g, &name, c) {
                    let about = format!("{}: {}", g.variant, g.doc);
                    v.push(EntryPoint {
                        module,
                        name,
                        threads: g.threads,
                        smem: g.smem,
                        cluster: g.cluster,
                        tma: g.w_by_tma,
                        archs: g.archs.clone(),
                        def,
                        about,
                        plain: false,
                    });
                }
            }
        }
        for g in self.gemm.iter().filter(|g| !g.quant.is_empty()) {
            let module = self.module_index(g.body.modules().1);
            for t in &g.types {
                let c = &self.elem_types.iter().find(|e| &e.0 == t).unwrap().1;
                for (fi, ((fmt, smem), (_, fc))) in g.quant.iter().zip(&self.quant_formats).enumerate() {
                    let name = quant_name(t, fmt, &g.suffix);
                    let (bm, bn, threads) = (g.tile.0, g.tile.1, g.threads);
                    let def = match &g.body {
                        Body::Tc { block_k, warp_tile: (wm, wn), stages, min_blocks } => {
                            format!("SMOE_TCQ_ENTRY({name}, {c}, {fc}, {bm}, {bn}, {block_k}, {wm}, {wn}, {stages}, {min_blocks}, {threads}, {smem})")
                        }
                        Body::Skinny { quant_min_blocks, quant_unroll, .. } => {
                            let u = quant_unroll[fi];
                            format!("SMOE_SKINNY_Q_ENTRY({name}, {c}, {fc}, {bm}, {bn}, {threads}, {quant_min_blocks}, {u}, {smem})")
                        }
                        Body::Ws { stages } => format!("SMOE_WSQ_ENTRY({name}, {c}, {fc}, {stages}, {bm}, {bn}, {threads}, {smem})"),
                        _ => unreachable!("quant is refused on reading for other kernels"),
                    };
                    v.push(EntryPoint {
                        module,
                        name,
                        threads,
                        smem: *smem,
                        cluster: 1,
                        tma: false,
                        archs: g.archs.clone(),
                        def,
                        about: format!("{} with quantized W: {}", g.variant, g.doc),
                        plain: false,
                    });
                }
            }
        }
        v
    }
}

/// The entry point of a GEMM configuration's quantized-weight form (kernels/quant_gemm.cu).
fn quant_name(t: &str, fmt: &str, suffix: &str) -> String {
    format!("scattermoe_qgemm_{t}_{fmt}_{suffix}")
}

/// The invocations of kernels/grouped_gemm.cu's (grouped_gemm_ws.cu's) entry macros that define
/// configuration `g` for the element type `c` (C) as `name`: (entry point, invocation), the grouped-A form after the base.
fn gemm_entries(g: &Gemm, name: &str, c: &str) -> Vec<(String, String)> {
    let (bm, bn, threads, smem) = (g.tile.0, g.tile.1, g.threads, g.smem);
    match g.body {
        Body::Tc { block_k, warp_tile: (wm, wn), stages, min_blocks } => {
            vec![(name.into(), format!("SMOE_TC_ENTRY({name}, {c}, {bm}, {bn}, {block_k}, {wm}, {wn}, {stages}, {min_blocks}, {threads}, {smem})"))]
        }
        Body::Ws { stages } if !g.w_by_tma => vec![(name.into(), format!("SMOE_WS_ENTRY({name}, {c}, {stages}, {bm}, {bn}, {threads}, {smem})"))],
        Body::Ws { stages } => {
            // W by TMA: one CTA per tile, or a CTA pair sharing W (cluster 2, checked on reading)
            let (wload, cluster) = if g.cluster == 2 { ("WS_TMA_PAIR", "SMOE_CLUSTER_PAIR") } else { ("WS_TMA", "SMOE_CLUSTER_NONE") };
            let args = format!("{c}, {stages}, {wload}, {cluster}, {bm}, {bn}, {threads}, {smem}");
            let mut v = vec![(name.into(), format!("SMOE_WS_TMA_ENTRY({name}, {args})"))];
            if g.grouped_a_form {
                let ga = format!("{name}{GROUPED_A_SUFFIX}");
                v.push((ga.clone(), format!("SMOE_WS_GA_ENTRY({ga}, {args})")));
            }
            v
        }
        Body::F32 => vec![(name.into(), format!("SMOE_F32_ENTRY({name}, {c}, {bm}, {bn}, {threads}, {smem})"))],
        Body::Skinny { min_blocks, unroll, .. } => {
            vec![(name.into(), format!("SMOE_SKINNY_ENTRY({name}, {c}, {bm}, {bn}, {threads}, {min_blocks}, {unroll}, {smem})"))]
        }
    }
}

fn arch_variant(a: &str) -> String {
    let mut c = a.chars();
    c.next().map_or(String::new(), |f| f.to_uppercase().chain(c).collect())
}

/// The enum variant of a snake_case value name, as src/spec/values.rs writes them (gelu_tanh ->
/// GeluTanh).
fn camel(name: &str) -> String {
    name.split('_').map(arch_variant).collect()
}

const GENERATED_C: &str = "// Generated by build.rs from kernels/manifest.toml: do not edit. A unit test of the crate checks\n\
     // that the copy in kernels/generated/ is current; `SCATTERMOE_UPDATE_TABLES=1 cargo test --release\n\
     // --lib catalogue` rewrites it.\n";

/// The headers the kernel sources include, (file name, text): `<module>_entries.cuh` for each
/// module, and `activations.cuh`.
fn c_headers(m: &Manifest) -> Vec<(String, String)> {
    let eps = m.entry_points();
    let mut v = Vec::new();
    for (i, module) in m.modules.iter().enumerate() {
        let mut s = format!("{GENERATED_C}// The entry points of kernels/{module}.cu, which includes this file at its end: one invocation\n// of that file's entry macros per entry point.\n");
        let mut about = "";
        for e in eps.iter().filter(|e| e.module == i) {
            if e.about != about {
                writeln!(s, "\n// {}", e.about).unwrap();
                about = &e.about;
            }
            writeln!(s, "{}", e.def).unwrap();
        }
        v.push((format!("{module}_entries.cuh"), s));
    }
    let mut s = format!(
        "{GENERATED_C}// The codes of the GEMM kernels' `act` parameter (kernels/manifest.toml's `activations`), included\n\
         // by kernels/common.cuh. Their math: activate() / glu() there, and the epilogue dispatch of\n\
         // kernels/gemm_hopper_ws.cuh.\n#pragma once\n\n"
    );
    for (code, a) in m.activations.iter().enumerate() {
        writeln!(s, "#define SMOE_ACT_{} {code}", a.to_uppercase()).unwrap();
    }
    v.push(("activations.cuh".into(), s));
    v
}

/// The Rust tables (`crate::cuda::catalogue` includes them).
fn rust_tables(m: &Manifest) -> String {
    let mut s = String::from("// Generated by build.rs from kernels/manifest.toml.\n\n");
    let arches = |v: &[String]| v.iter().map(|a| format!("Arch::{}", arch_variant(a))).collect::<Vec<_>>().join(", ");
    let all: Vec<String> = m.targets.iter().map(|t| t.0.clone()).collect();
    writeln!(s, "/// The arches the fatbins hold native code for.\npub const TARGETS: [Arch; {}] = [{}];\n", all.len(), arches(&all)).unwrap();
    writeln!(s, "/// Kernel modules (kernels/<name>.cu), in load order.\npub const MODULES: [&str; {}] = {:?};\n", m.modules.len(), m.modules).unwrap();
    s.push_str("/// Every entry point of the fatbins, in manifest order (kernels/generated/<module>_entries.cuh\n/// defines each, from the same list).\npub static ENTRIES: &[Entry] = &[\n");
    for e in m.entry_points() {
        writeln!(
            s,
            "    Entry {{ module: {}, name: {:?}, threads: {}, smem: {}, cluster: {}, tma: {}, archs: &[{}] }},",
            e.module,
            e.name,
            e.threads,
            e.smem,
            e.cluster,
            e.tma,
            arches(&e.archs)
        )
        .unwrap();
    }
    s.push_str("];\n\n");
    writeln!(
        s,
        "/// The name suffix of the form of a kernel for grouped input that reads A through TMA too (see\n/// [`GemmCfg::has_grouped_a_form`]).\npub const GROUPED_A_SUFFIX: &str = {GROUPED_A_SUFFIX:?};\n"
    )
    .unwrap();
    writeln!(
        s,
        "/// The kernels' activation codes (`act`, SMOE_ACT_* in kernels/generated/activations.cuh): the\n/// code is the position; \"none\" is the identity.\npub const ACTIVATIONS: [&str; {}] = {:?};\n",
        m.activations.len(),
        m.activations
    )
    .unwrap();
    let fmts: Vec<&String> = m.quant_formats.iter().map(|f| &f.0).collect();
    writeln!(
        s,
        "/// The quantized weight formats of kernels/quant_gemm.cu, in manifest order (entry points\n/// `scattermoe_qgemm_{{t}}_{{format}}_{{suffix}}`).\npub const QUANT_FORMATS: [&str; {}] = {:?};\n",
        fmts.len(),
        fmts
    )
    .unwrap();
    s.push_str("/// The kernels' code of an activation (None: the identity). A value of `Activation` missing from the\n/// manifest's `activations` makes this match non-exhaustive: the build names it.\npub const fn act_code(a: Option<Activation>) -> i32 {\n    match a {\n        None => 0,\n");
    for (code, a) in m.activations.iter().enumerate().skip(1) {
        writeln!(s, "        Some(Activation::{}) => {code},", camel(a)).unwrap();
    }
    s.push_str("    }\n}\n\n/// One grouped-GEMM kernel configuration (the suffix of its entry point).\n");
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
    method(
        &mut s,
        "has_quant(self) -> bool",
        "Whether it has quantized-weight forms (kernels/quant_gemm.cu; the skinny kernel's in kernels/skinny_gemm.cu), one per format of `QUANT_FORMATS`.",
        &|g| (!g.quant.is_empty()).to_string(),
    );
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
    let py_list = |v: Vec<String>| {
        if v.len() == 1 {
            format!("({:?},)", v[0])
        } else {
            format!("({})", v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(", "))
        }
    };
    writeln!(s, "MODULES = {}", py_list(m.modules.clone())).unwrap();
    let codes = m.activations.iter().enumerate().map(|(c, a)| format!("{a:?}: {c}")).collect::<Vec<_>>().join(", ");
    writeln!(s, "# the kernels' activation codes (`act`)\nACT = {{{codes}}}").unwrap();
    s.push_str("# block size of each kernel with a plain launch\nPLAIN_THREADS = {\n");
    for e in m.entry_points().iter().filter(|e| e.plain) {
        writeln!(s, "    {:?}: {},", e.name, e.threads).unwrap();
    }
    s.push_str("}\n");
    // every tensor-core entry-point suffix, its grouped-A form included
    let mut forms: Vec<(String, &Gemm, bool)> = Vec::new();
    for g in m.gemm.iter().filter(|g| g.types.iter().any(|t| t != "f32")) {
        forms.push((g.suffix.clone(), g, false));
        if g.grouped_a_form {
            forms.push((format!("{}{GROUPED_A_SUFFIX}", g.suffix), g, true));
        }
    }
    s.push_str("# name suffix -> (BM, BN, threads, dynamic smem bytes)\nTC_CFGS = {\n");
    for (name, g, _) in &forms {
        writeln!(s, "    {name:?}: ({}, {}, {}, {}),", g.tile.0, g.tile.1, g.threads, g.smem).unwrap();
    }
    s.push_str("}\n# CTAs per cluster (__cluster_dims__ in the kernel), where more than one\nCLUSTER = {");
    s.push_str(&forms.iter().filter(|f| f.1.cluster > 1).map(|(n, g, _)| format!("{n:?}: {}", g.cluster)).collect::<Vec<_>>().join(", "));
    s.push_str("}\n");
    writeln!(s, "# W through a TMA map (one more parameter)\nTMA_W = {}", py_list(forms.iter().filter(|f| f.1.w_by_tma).map(|f| f.0.clone()).collect()))
        .unwrap();
    writeln!(
        s,
        "# grouped input only: A through a TMA map too (one more parameter again)\nGROUPED_A = {}",
        py_list(forms.iter().filter(|f| f.2).map(|f| f.0.clone()).collect())
    )
    .unwrap();
    let all: Vec<String> = m.targets.iter().map(|t| t.0.clone()).collect();
    writeln!(
        s,
        "# native code for sm90a only (the body traps elsewhere)\nSM90A_ONLY = {}",
        py_list(forms.iter().filter(|f| f.1.archs != all).map(|f| f.0.clone()).collect())
    )
    .unwrap();
    for g in m.gemm.iter().filter(|g| g.types.iter().all(|t| t == "f32")) {
        writeln!(s, "F32_CFG = ({}, {}, {}, {})", g.tile.0, g.tile.1, g.threads, g.smem).unwrap();
    }
    writeln!(
        s,
        "# the quantized weight formats (kernels/quant_gemm.cu: scattermoe_qgemm_{{t}}_{{format}}_{{suffix}})\nQUANT_FORMATS = {}",
        py_list(m.quant_formats.iter().map(|f| f.0.clone()).collect())
    )
    .unwrap();
    s.push_str("# suffix -> {format: (BM, BN, threads, dynamic smem bytes)} of the quantized forms\nQUANT_CFGS = {\n");
    for g in m.gemm.iter().filter(|g| !g.quant.is_empty()) {
        let per = g.quant.iter().map(|(f, smem)| format!("{f:?}: ({}, {}, {}, {smem})", g.tile.0, g.tile.1, g.threads)).collect::<Vec<_>>().join(", ");
        writeln!(s, "    {:?}: {{{per}}},", g.suffix).unwrap();
    }
    s.push_str("}\n");
    // the module (kernels/<module>.cu) holding each suffix's entry points
    let module_dict = |v: Vec<(String, &str)>| v.iter().map(|(n, m)| format!("{n:?}: {m:?}")).collect::<Vec<_>>().join(", ");
    writeln!(
        s,
        "# suffix -> the module of its entry points (16-bit W), and of its quantized forms\nGEMM_MODULE = {{{}}}\nQUANT_MODULE = {{{}}}",
        module_dict(forms.iter().map(|(n, g, _)| (n.clone(), g.body.modules().0)).collect()),
        module_dict(m.gemm.iter().filter(|g| !g.quant.is_empty()).map(|g| (g.suffix.clone(), g.body.modules().1)).collect())
    )
    .unwrap();
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

/// A digest of everything the fatbins depend on: nvcc's version, its arguments, the generated
/// headers, every file in kernels/.
fn kernel_stamp(nvcc: &Path, args: &[String], headers: &[(String, String)], root: &Path) -> String {
    let mut h = DefaultHasher::new();
    headers.hash(&mut h);
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
    // The kernels compile against these, not against the committed copies in kernels/generated/
    // (the sources include them by bare name, and nvcc is not given that folder), so the fatbins
    // always define the entry points the Rust tables above list.
    let headers = c_headers(&manifest);
    let generated = out.join("kernels-generated");
    // written afresh: a header of a module the manifest no longer has (built before on another
    // branch) would otherwise stay behind and fail the catalogue's check of the committed copies
    let _ = std::fs::remove_dir_all(&generated);
    std::fs::create_dir_all(&generated).unwrap();
    for (name, text) in &headers {
        std::fs::write(generated.join(name), text).unwrap();
    }

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
            let stamp = kernel_stamp(nvcc, &args, &headers, &root);
            let fatbin = |name: &str| out.join(format!("{name}.fatbin"));
            let names: Vec<String> = sources.iter().map(|s| s.file_stem().unwrap().to_string_lossy().into_owned()).collect();
            let current = std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) && names.iter().all(|n| fatbin(n).exists());
            if !current {
                let _ = std::fs::remove_file(&stamp_path);
                // One nvcc per file, in parallel (the wgmma files and quant_gemm.cu take longest).
                let jobs: Vec<_> = sources
                    .iter()
                    .zip(&names)
                    .map(|(src, name)| {
                        let child = Command::new(nvcc)
                            .arg("-fatbin")
                            .args(&args)
                            .arg(format!("-I{}", root.join("kernels").display()))
                            .arg(format!("-I{}", generated.display()))
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
