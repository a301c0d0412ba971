//! The element types and shapes of one node's inputs, by contract index: what every runtime
//! adapter (ONNX Runtime's CPU and CUDA kernels, the TensorRT plugin) hands the contract's
//! `spec::*::check` and the device ops (`crate::cuda::ops`). Runtime-neutral: each adapter fills
//! it from its own tensor descriptions.

use crate::spec::{unknown_ranks_as_symbolic, Dim, Port};

/// Element types (ONNX codes; None: input absent or type not known yet) and shapes (None: input
/// absent; a `None` dimension: not known yet) of a node's inputs, in contract order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Signature {
    pub types: Vec<Option<i32>>,
    pub shapes: Vec<Option<Vec<Dim>>>,
}

impl Signature {
    /// Before run time: an input of unknown rank (reported with no dimensions) is checked as one
    /// of unknown dimensions.
    pub fn before_run(ports: &[Port], types: Vec<Option<i32>>, mut shapes: Vec<Option<Vec<Dim>>>) -> Self {
        unknown_ranks_as_symbolic(ports, &mut shapes);
        Signature { types, shapes }
    }

    /// At run time: every present input with its type and its known dimensions.
    pub fn at_run(inputs: impl IntoIterator<Item = Option<(i32, Vec<u64>)>>) -> Self {
        let (types, shapes) =
            inputs.into_iter().map(|i| i.map_or((None, None), |(t, d)| (Some(t), Some(d.into_iter().map(Some).collect())))).unzip();
        Signature { types, shapes }
    }

    pub fn shape_refs(&self) -> Vec<Option<&[Dim]>> {
        self.shapes.iter().map(|s| s.as_deref()).collect()
    }

    /// Whether input `i` is present.
    pub fn has(&self, i: usize) -> bool {
        self.shapes.get(i).is_some_and(Option::is_some)
    }

    /// The known dimensions of input `i` (empty when absent; a dimension not known is 0).
    pub fn dims(&self, i: usize) -> Vec<usize> {
        self.shapes.get(i).and_then(Option::as_ref).map_or(Vec::new(), |s| s.iter().map(|d| d.unwrap_or(0) as usize).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_time_signature_keeps_absent_inputs_in_place() {
        let s = Signature::at_run([Some((1, vec![2, 3])), None, Some((7, vec![4]))]);
        assert_eq!(s.types, [Some(1), None, Some(7)]);
        assert_eq!(s.shapes, [Some(vec![Some(2), Some(3)]), None, Some(vec![Some(4)])]);
        assert!(s.has(0) && !s.has(1) && s.has(2) && !s.has(3));
        assert_eq!(s.dims(0), [2, 3]);
        assert_eq!(s.dims(1), Vec::<usize>::new());
        assert_eq!(s.shape_refs()[1], None);
    }
}
