//! What a rewrite did: every layer replaced, every candidate left as is and why, as text for a
//! person and as JSON (serde) for a program. `scattermoe inspect` shows the same report as one
//! list of candidates ([`Report::candidates`]).

use std::fmt::Write as _;

use serde::{Serialize, Serializer};

use super::looks_like::LooksLike;
use super::prove;

/// A candidate left as it was, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    pub family: &'static str,
    /// the value where the candidate ends
    pub at: String,
    pub reason: String,
}

/// One replaced layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub family: &'static str,
    pub output: String,
    pub node: String,
    pub experts: usize,
    pub k: Option<usize>,
    pub d: usize,
    pub f: usize,
    pub activation: &'static str,
    pub gated: bool,
    pub glu_layout: &'static str,
    pub elem_type: &'static str,
    pub capacity: Option<i64>,
    pub biases: bool,
    /// the quantized weights the node reads, e.g. "w_in int4 blocks [1, 32], w_out int8 per
    /// channel"; None where its weights are in its element type
    pub quantized: Option<String>,
    /// what the numeric proof compared; None when the proof was turned off
    #[serde(serialize_with = "proof_json")]
    pub proof: Option<prove::Proof>,
    /// whether its ONNX router became one TopKRouter node (`router_fusion`); None where fusion
    /// did not run (TensorRT, `--keep-router`, a projection without a router)
    pub router: Option<RouterReport>,
}

/// What became of a layer's router.
#[derive(Debug, Clone, Serialize)]
pub struct RouterReport {
    pub fused: bool,
    /// the TopKRouter's attributes ("softmax, k=2, normalize, lower_index"), or why the ONNX
    /// router stays
    pub detail: String,
}

impl RouterReport {
    pub fn text(&self) -> String {
        if self.fused {
            format!("router fused: TopKRouter({})", self.detail)
        } else {
            format!("router left as ONNX nodes: {}", self.detail)
        }
    }
}

/// The shape of a candidate a rule matched, before it was emitted and proven: kept so that a
/// candidate left as is at those steps can still be described.
#[derive(Debug, Clone, Serialize)]
pub struct Found {
    pub family: &'static str,
    /// the value where the candidate ends
    pub at: String,
    pub experts: usize,
    pub k: Option<usize>,
    pub d: usize,
    pub f: usize,
    pub elem_type: &'static str,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub layers: Vec<LayerReport>,
    pub rejected: Vec<Rejection>,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub initializers_before: usize,
    pub initializers_after: usize,
    /// regions no rule covered that have a router and per-expert weights ("looks like MoE, not
    /// proven"), left as they are
    pub looks_like_moe: Vec<LooksLike>,
    /// every candidate the rules matched (replaced or not); [`Report::candidates`] reads it
    #[serde(skip)]
    pub found: Vec<Found>,
}

/// One candidate as `scattermoe inspect` lists it: what it is (where known) and whether the
/// rewrite replaces it.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub family: &'static str,
    /// the value where the candidate ends
    pub at: String,
    pub experts: Option<usize>,
    pub k: Option<usize>,
    pub d: Option<usize>,
    pub f: Option<usize>,
    pub elem_type: Option<&'static str>,
    /// replaced by `rewrite` (proven, unless the proof was turned off)
    pub rewrite: bool,
    /// why it is left as is
    pub reason: Option<String>,
}

/// The proof as JSON: its fields, or null when it did not run.
fn proof_json<S: Serializer>(p: &Option<prove::Proof>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct P<'a> {
        tokens: &'a [usize],
        cases: usize,
        max_rel_err: f64,
        tolerance: f64,
        millis: f64,
        /// something of the region was computed in float32 for the comparison (`reference` says what)
        float32_reference: bool,
        /// "region", "node_float32" (its 16-bit com.microsoft.MoE node), "region_float32" (its
        /// float32 twin, where it cannot run in its 16-bit type)
        reference: &'static str,
    }
    p.as_ref()
        .map(|p| P {
            tokens: &p.tokens,
            cases: p.cases,
            max_rel_err: p.max_rel_err,
            tolerance: p.tolerance,
            millis: p.millis,
            float32_reference: p.reference.float32(),
            reference: p.reference.name(),
        })
        .serialize(s)
}

fn opt(v: Option<usize>) -> String {
    v.map_or("?".to_string(), |k| k.to_string())
}

impl Report {
    pub fn text(&self) -> String {
        let mut s = String::new();
        if self.layers.is_empty() {
            let _ = writeln!(s, "no MoE layer was replaced");
        }
        for l in &self.layers {
            let _ = writeln!(
                s,
                "replaced {} layer -> {} ({}): E={} k={} d={} f={} activation={}{} {}{}{}{}",
                l.family,
                l.output,
                l.node,
                l.experts,
                opt(l.k),
                l.d,
                l.f,
                l.activation,
                if l.gated { format!(" gated ({})", l.glu_layout) } else { String::new() },
                l.elem_type,
                if l.biases { " with biases" } else { "" },
                l.capacity.map_or(String::new(), |c| format!(" capacity={c}")),
                l.quantized.as_ref().map_or(String::new(), |q| format!(", quantized weights: {q}")),
            );
            let _ = writeln!(s, "  {}", l.proof.as_ref().map_or("not proven (proof turned off)".to_string(), prove::Proof::text));
            if let Some(r) = &l.router {
                let _ = writeln!(s, "  {}", r.text());
            }
        }
        for r in &self.rejected {
            let _ = writeln!(s, "left as is: {} candidate ending at {}: {}", r.family, r.at, r.reason);
        }
        for l in &self.looks_like_moe {
            let _ = writeln!(s, "left as is: at {}: {}", l.at, l.text());
        }
        let _ = writeln!(s, "nodes {} -> {}, initializers {} -> {}", self.nodes_before, self.nodes_after, self.initializers_before, self.initializers_after);
        s
    }

    /// The report as one line of JSON: `layers` (each with its `proof`, or null), `rejected`,
    /// `looks_like_moe` (each with `at`, `router`, `experts`, `k`, `anchors`, `reason`), and the
    /// node and initializer counts.
    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("a report serializes (strings, numbers, booleans only)")
    }

    /// Every candidate, replaced ones first: the replaced layers, then each candidate left as
    /// is, described by what its rule matched where it got that far.
    pub fn candidates(&self) -> Vec<Candidate> {
        let mut out: Vec<Candidate> = self
            .layers
            .iter()
            .map(|l| Candidate {
                family: l.family,
                at: l.output.clone(),
                experts: Some(l.experts),
                k: l.k,
                d: Some(l.d),
                f: Some(l.f),
                elem_type: Some(l.elem_type),
                rewrite: true,
                reason: None,
            })
            .collect();
        for r in &self.rejected {
            let found = self.found.iter().find(|f| f.at == r.at && f.family == r.family);
            out.push(Candidate {
                family: r.family,
                at: r.at.clone(),
                experts: found.map(|f| f.experts),
                k: found.and_then(|f| f.k),
                d: found.map(|f| f.d),
                f: found.map(|f| f.f),
                elem_type: found.map(|f| f.elem_type),
                rewrite: false,
                reason: Some(r.reason.clone()),
            });
        }
        for l in &self.looks_like_moe {
            out.push(Candidate {
                family: "looks_like_moe",
                at: l.at.clone(),
                experts: Some(l.experts),
                k: l.k,
                d: None,
                f: None,
                elem_type: None,
                rewrite: false,
                reason: Some(l.text()),
            });
        }
        out
    }
}

impl Candidate {
    /// One line: `family at: E=.. k=.. d=.. f=.. dtype: would rewrite | left as is (reason)`.
    pub fn text(&self, proven: bool) -> String {
        let shape = match (self.experts, self.d, self.f) {
            (Some(e), Some(d), Some(f)) => format!("E={e} k={} d={d} f={f} {}", opt(self.k), self.elem_type.unwrap_or("?")),
            (Some(e), None, None) if self.family == "looks_like_moe" => format!("E={e} k={}", opt(self.k)),
            _ => "E=? k=? d=? f=? (the rule stopped before the shapes were read)".to_string(),
        };
        let verdict = match (&self.reason, proven) {
            (Some(r), _) => format!("left as is: {r}"),
            (None, true) => "would rewrite (proven)".to_string(),
            (None, false) => "would rewrite (not proven: --no-prove)".to_string(),
        };
        format!("{} candidate ending at {}: {shape}: {verdict}", self.family, self.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes_every_string_and_keeps_the_field_names() {
        let rep = Report {
            rejected: vec![Rejection { family: "hf_loop", at: "a\"b\\c\nd\u{1}é".into(), reason: "why \"not\"".into() }],
            nodes_before: 3,
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_str(&rep.json()).unwrap();
        assert_eq!(v["rejected"][0]["at"], "a\"b\\c\nd\u{1}é");
        assert_eq!(v["rejected"][0]["reason"], "why \"not\"");
        assert_eq!(v["nodes_before"], 3);
        assert!(v["layers"].as_array().unwrap().is_empty());
        assert!(v.get("found").is_none(), "found is internal: {v}");
    }

    #[test]
    fn a_candidate_left_after_matching_keeps_its_shapes() {
        let found = |at: &str| Found { family: "hf_loop", at: at.into(), experts: 8, k: Some(2), d: 32, f: 64, elem_type: "float16" };
        let rep = Report {
            rejected: vec![
                Rejection { family: "hf_loop", at: "y".into(), reason: "not proven: differs".into() },
                Rejection { family: "dense", at: "z".into(), reason: "no router".into() },
            ],
            found: vec![found("y")],
            ..Default::default()
        };
        let c = rep.candidates();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].text(true), "hf_loop candidate ending at y: E=8 k=2 d=32 f=64 float16: left as is: not proven: differs");
        assert_eq!(c[1].text(true), "dense candidate ending at z: E=? k=? d=? f=? (the rule stopped before the shapes were read): left as is: no router");
    }
}
