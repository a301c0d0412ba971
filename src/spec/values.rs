//! The allowed values of the string attributes (`activation`, `glu_layout`, `capacity_order`,
//! `scoring`, `tie_break`),
//! each declared by one table: a row per value gives the variant, the name a model writes, and
//! what it means. The enum, its `ALL` list, `name`, `from_name`, and the "supported: ..." list of
//! the error message all come from that table, so a new value is one new row here (plus what it
//! computes, wherever the op is implemented: see docs/extending.md).

use super::{err, AttrSource, SpecError};

/// A string attribute's value set, as its table declares it.
pub trait AllowedValue: Copy + 'static {
    /// The names a model may write, in table order (the order error messages list them in).
    const NAMES: &'static [&'static str];
    fn from_name(s: &str) -> Option<Self>;
}

/// Declares a value set from its table (see the module comment).
macro_rules! allowed_values {
    (
        $(#[$meta:meta])*
        pub enum $ty:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $name:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $ty {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $ty {
            pub const ALL: [$ty; [$($ty::$variant),+].len()] = [$($ty::$variant),+];

            /// The name a model writes for this value.
            pub const fn name(self) -> &'static str {
                match self {
                    $( $ty::$variant => $name, )+
                }
            }

            pub fn from_name(s: &str) -> Option<Self> {
                Self::ALL.into_iter().find(|a| a.name() == s)
            }
        }

        impl AllowedValue for $ty {
            const NAMES: &'static [&'static str] = &[$($name),+];
            fn from_name(s: &str) -> Option<Self> {
                $ty::from_name(s)
            }
        }
    };
}

allowed_values! {
    /// Activation applied between the two expert projections.
    pub enum Activation {
        /// x * sigmoid(x)
        Silu = "silu",
        /// x * Phi(x), the exact (erf) form
        Gelu = "gelu",
        /// the tanh approximation of GELU
        GeluTanh = "gelu_tanh",
        /// max(x, 0)
        Relu = "relu",
        /// max(x, 0)^2, the squared ReLU (Nemotron-H's experts; transformers' "relu2")
        Relu2 = "relu2",
        /// GPT-OSS's clamped SwiGLU: g = min(gate, limit), u = clamp(up, -limit, limit),
        /// h = (u + 1) * g * sigmoid(alpha * g). Gated only.
        SwigluOai = "swiglu_oai",
        /// SwiGLU with both projections clamped and no offset on up: g = min(gate, limit),
        /// u = clamp(up, -limit, limit), h = u * g * sigmoid(alpha * g) (GLM-5-Next and HY-V4
        /// with alpha = 1). Gated only.
        SwigluLimit = "swiglu_limit",
    }
}

impl Activation {
    /// Whether the activation is defined only over a gate and an up projection.
    pub const fn gated_only(self) -> bool {
        matches!(self, Activation::SwigluOai | Activation::SwigluLimit)
    }

    /// Whether the activation reads the `alpha` and `limit` attributes.
    pub const fn clamped(self) -> bool {
        matches!(self, Activation::SwigluOai | Activation::SwigluLimit)
    }
}

allowed_values! {
    /// How the 2f rows of a gated `w_in` hold the gate and the up projection.
    pub enum GluLayout {
        /// rows [0, f) gate, rows [f, 2f) up (Mixtral's w1 then w3)
        GateUp = "gate_up",
        /// rows [0, f) up, rows [f, 2f) gate
        UpGate = "up_gate",
        /// row 2i gate, row 2i+1 up (GPT-OSS)
        Interleaved = "interleaved",
    }
}

impl GluLayout {
    /// Row of `w_in` (and element of `b_in`) holding gate unit `i` and up unit `i`, for `f` units.
    #[inline]
    pub const fn rows(self, i: usize, f: usize) -> (usize, usize) {
        match self {
            GluLayout::GateUp => (i, f + i),
            GluLayout::UpGate => (f + i, i),
            GluLayout::Interleaved => (2 * i, 2 * i + 1),
        }
    }
}

allowed_values! {
    /// Which assignments win an expert's capacity when it is oversubscribed.
    pub enum CapacityOrder {
        /// all first choices (slot 0) in token order, then all slot-1 choices, ... (GShard, Switch)
        SlotMajor = "slot_major",
        /// token 0's choices, then token 1's, ...
        TokenMajor = "token_major",
    }
}

allowed_values! {
    /// What `TopKRouter` ranks the experts by, and how it turns the chosen ones into weights.
    pub enum Scoring {
        /// p = softmax(logits) over all E (float32); the k largest p, weights p (Mixtral, Qwen3,
        /// OLMoE, com.microsoft.MoE)
        Softmax = "softmax",
        /// the k largest logits; weights softmax over those k (GPT-OSS)
        TopkSoftmax = "topk_softmax",
        /// p = sigmoid(logits); the k largest p, weights p (Llama 4)
        Sigmoid = "sigmoid",
        /// p = logits: the scores are computed before the node, by the graph (a Softmax in 16
        /// bits, which ONNX Runtime's CPU and CUDA providers round differently; any other scoring)
        Identity = "identity",
    }
}

allowed_values! {
    /// Which of two equal scores `TopKRouter` ranks first.
    pub enum TieBreak {
        /// the lower expert number (ONNX TopK, torch.topk)
        LowerIndex = "lower_index",
        /// the higher expert number (ONNX Runtime's com.microsoft.MoE kernels)
        HigherIndex = "higher_index",
    }
}

allowed_values! {
    /// How `TopKRouter` scores a group of experts for the group-limited choice (DeepSeek-V2/V3).
    pub enum GroupScore {
        /// the sum of the group's two best choice scores (DeepSeek-V3, GLM-4.5, Kimi, Mistral 4)
        Top2Sum = "top2_sum",
        /// the group's best choice score (DeepSeek-V2's `group_limited_greedy`)
        Max = "max",
    }
}

allowed_values! {
    /// Which value of a chosen expert `TopKRouter` turns into its weight.
    pub enum WeightsFrom {
        /// its score, without the selection bias (torch: `scores.gather(1, topk_indices)`)
        Scores = "scores",
        /// the score it was chosen by: bias added, `group_fill` where its group lost (torch: the
        /// values of `topk` over the masked choice scores, DeepSeek-V2)
        Choice = "choice",
    }
}

/// Reads a string attribute into its value set; absent means `default`.
pub(super) fn read_enum<T: AllowedValue>(op: &'static str, src: &dyn AttrSource, name: &str, default: T) -> Result<T, SpecError> {
    match src.string(name) {
        None => Ok(default),
        Some(s) => match T::from_name(&s) {
            Some(v) => Ok(v),
            None => err(op, format!("attribute '{name}' has unsupported value '{s}' (supported: {})", T::NAMES.join(", "))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table is the single source: names round-trip, and the error list is the name list.
    fn round_trip<T: AllowedValue + PartialEq + std::fmt::Debug>(all: &[T], name: fn(T) -> &'static str) {
        assert_eq!(all.len(), T::NAMES.len());
        for (v, n) in all.iter().zip(T::NAMES) {
            assert_eq!(name(*v), *n);
            assert_eq!(T::from_name(n), Some(*v));
        }
        assert_eq!(T::from_name("no_such_value"), None);
    }

    #[test]
    fn tables_round_trip() {
        round_trip(&Activation::ALL, Activation::name);
        round_trip(&GluLayout::ALL, GluLayout::name);
        round_trip(&CapacityOrder::ALL, CapacityOrder::name);
        round_trip(&Scoring::ALL, Scoring::name);
        round_trip(&TieBreak::ALL, TieBreak::name);
        round_trip(&GroupScore::ALL, GroupScore::name);
        round_trip(&WeightsFrom::ALL, WeightsFrom::name);
        assert_eq!(Activation::NAMES, ["silu", "gelu", "gelu_tanh", "relu", "relu2", "swiglu_oai", "swiglu_limit"]);
    }
}
