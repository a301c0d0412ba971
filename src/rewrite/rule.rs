//! One rule per MoE family behind one trait, and the registry the driver runs (onnxscript's
//! rewriter model: a rule has a name and a `find` that returns its candidates and, for what it
//! looked at and left, the reasons). Adding a family is one line in [`registry`].

use super::emit::MoeLayer;
use super::{batched, capacity, dense, hf_loop, jetmoe, llama4, megablocks, ort_moe, Rejection};
use crate::onnx::graph::GraphIndex;

pub trait Rule: Sync {
    /// the family name the report uses
    fn name(&self) -> &'static str;
    /// Candidates this rule recognises in `g`, and the ones it looked at and left, with why.
    fn find(&self, g: &GraphIndex) -> (Vec<MoeLayer>, Vec<Rejection>);
}

/// A rule given by a family's `find` function.
pub struct FnRule {
    pub name: &'static str,
    pub find: fn(&GraphIndex) -> (Vec<MoeLayer>, Vec<Rejection>),
}

impl Rule for FnRule {
    fn name(&self) -> &'static str {
        self.name
    }
    fn find(&self, g: &GraphIndex) -> (Vec<MoeLayer>, Vec<Rejection>) {
        (self.find)(g)
    }
}

static RULES: [FnRule; 8] = [
    FnRule { name: "hf_loop", find: hf_loop::find },
    FnRule { name: "dense", find: dense::find },
    FnRule { name: "capacity", find: capacity::find },
    FnRule { name: "megablocks", find: megablocks::find },
    FnRule { name: "ort_moe", find: ort_moe::find },
    FnRule { name: "jetmoe", find: jetmoe::find },
    FnRule { name: "llama4", find: llama4::find },
    FnRule { name: "batched", find: batched::find },
];

/// Every rule, in the order the driver runs them (an earlier rule's candidate wins when two
/// replace the same value).
pub fn registry() -> Vec<&'static dyn Rule> {
    RULES.iter().map(|r| r as &dyn Rule).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_family_is_registered_once() {
        let names: Vec<&str> = super::registry().iter().map(|r| r.name()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "{names:?}");
        for f in ["hf_loop", "dense", "capacity", "megablocks", "ort_moe", "jetmoe", "llama4", "batched"] {
            assert!(names.contains(&f), "{f} missing from {names:?}");
        }
    }
}
