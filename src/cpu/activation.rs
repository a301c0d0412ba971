//! The activations of the op contract, evaluated in f32.

use crate::spec::{scatter_moe::Attrs, Activation, GluLayout};

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// erf from libm (the Rust port of musl's), evaluated in f64 so the f32 result is correctly rounded
/// for all practical purposes.
#[inline(always)]
fn erf(x: f32) -> f32 {
    libm::erf(x as f64) as f32
}

/// One activation applied to one value (the non-gated forms).
#[inline(always)]
pub fn apply(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Silu => x * sigmoid(x),
        Activation::Gelu => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::GeluTanh => {
            const C: f32 = 0.797_884_6; // sqrt(2/pi)
            0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
        }
        Activation::Relu => x.max(0.0),
        Activation::Relu2 => {
            let r = x.max(0.0);
            r * r
        }
        // Only reachable through `glu`; as plain activations they are refused by the contract.
        Activation::SwigluOai | Activation::SwigluLimit => x * sigmoid(1.702 * x),
    }
}

/// h = act(gate) * up, or the clamped forms of `swiglu_oai` (GPT-OSS) and `swiglu_limit`.
#[inline(always)]
pub fn glu(attrs: &Attrs, gate: f32, up: f32) -> f32 {
    match attrs.activation {
        Activation::SwigluOai => {
            let g = gate.min(attrs.limit);
            let u = up.clamp(-attrs.limit, attrs.limit);
            (u + 1.0) * g * sigmoid(attrs.alpha * g)
        }
        Activation::SwigluLimit => {
            let g = gate.min(attrs.limit);
            let u = up.clamp(-attrs.limit, attrs.limit);
            u * g * sigmoid(attrs.alpha * g)
        }
        act => apply(act, gate) * up,
    }
}

/// Applies the activation to a row of `n` first-projection outputs `a`, writing `f` hidden values.
#[inline]
pub fn activate_row(attrs: &Attrs, a: &[f32], h: &mut [f32]) {
    let f = h.len();
    if attrs.gated {
        let layout: GluLayout = attrs.glu_layout;
        for (i, hi) in h.iter_mut().enumerate() {
            let (g, u) = layout.rows(i, f);
            *hi = glu(attrs, a[g], a[u]);
        }
    } else {
        for (hi, &ai) in h.iter_mut().zip(a) {
            *hi = apply(attrs.activation, ai);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_at_known_points() {
        assert!((apply(Activation::Silu, 1.0) - 0.7310586).abs() < 1e-6);
        assert!((apply(Activation::Gelu, 1.0) - 0.8413447).abs() < 1e-6);
        assert!((apply(Activation::GeluTanh, 1.0) - 0.8411920).abs() < 1e-6);
        assert_eq!(apply(Activation::Relu, -2.0), 0.0);
        let a = Attrs { activation: Activation::SwigluOai, limit: 7.0, alpha: 1.702, ..Attrs::default() };
        // gate clamped to 7, up clamped to -7: (−7 + 1) * 7 * sigmoid(1.702 * 7)
        let want = -6.0 * 7.0 / (1.0 + (-1.702f32 * 7.0).exp());
        assert!((glu(&a, 9.0, -8.0) - want).abs() < 1e-5);
        assert_eq!(apply(Activation::Relu2, -2.0), 0.0);
        assert_eq!(apply(Activation::Relu2, 3.0), 9.0);
        // swiglu_limit, alpha 1, limit 10: gate clamped to 10, up to -10, no offset on up
        let a = Attrs { activation: Activation::SwigluLimit, limit: 10.0, alpha: 1.0, ..Attrs::default() };
        let want = -10.0 * 10.0 / (1.0 + (-10.0f32).exp());
        assert!((glu(&a, 12.0, -11.0) - want).abs() < 1e-4);
        // inside the limits it is silu(gate) * up
        assert!((glu(&a, 1.0, 2.0) - 2.0 * apply(Activation::Silu, 1.0)).abs() < 1e-6);
    }
}
