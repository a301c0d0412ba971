//! The second choice of a top-2 capacity layer (GShard) is ranked after every first choice of
//! its expert: its slot-major rank is `N + r`, N the expert's count of first choices (the
//! symbol [`F::Offset`]) and r its rank among the second choices ([`F::Rank`]). A function of
//! the two is a function of that rank alone when it reads them only through `r + N`; this
//! module checks that, structurally, so that the rank-by-rank evaluation of the parent module
//! can then set N = 0 and read r as the slot-major rank.

use super::F;

/// How a function depends on (r, N).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dep {
    /// reads neither
    Indep,
    /// `a r + b N + h`, h independent of both
    Lin(f64, f64),
    /// a function of `r + N` (and of what is independent of both)
    Sum,
    /// anything else
    Mixed,
}

fn tidy(d: Dep) -> Dep {
    match d {
        Dep::Lin(a, b) if a == 0.0 && b == 0.0 => Dep::Indep,
        d => d,
    }
}

/// The dependence an argument of a non-affine op passes on: only a function of `r + N`, or none.
fn through(d: Dep) -> Dep {
    match tidy(d) {
        Dep::Lin(a, b) if a == b => Dep::Sum,
        Dep::Lin(..) => Dep::Mixed,
        d => d,
    }
}

fn dep(f: &F) -> Dep {
    match f {
        F::Const(_) | F::Coord | F::Gate => Dep::Indep,
        F::Rank => Dep::Lin(1.0, 0.0),
        F::Offset => Dep::Lin(0.0, 1.0),
        F::Add(a, b) => match (dep(a), dep(b)) {
            (Dep::Mixed, _) | (_, Dep::Mixed) => Dep::Mixed,
            (Dep::Indep, y) => y,
            (x, Dep::Indep) => x,
            (Dep::Lin(a1, b1), Dep::Lin(a2, b2)) => tidy(Dep::Lin(a1 + a2, b1 + b2)),
            (x, y) => {
                if through(x) == Dep::Mixed || through(y) == Dep::Mixed {
                    Dep::Mixed
                } else {
                    Dep::Sum
                }
            }
        },
        F::Mul(a, b) => {
            let (x, y) = (dep(a), dep(b));
            // a constant factor scales the coefficients
            for (k, other) in [(a, y), (b, x)] {
                if let (Some(k), Dep::Lin(p, q)) = (k.constant(), other) {
                    return tidy(Dep::Lin(k * p, k * q));
                }
            }
            combine(&[x, y])
        }
        F::Max(a, b) | F::Min(a, b) | F::Cmp(_, a, b) => combine(&[dep(a), dep(b)]),
        F::OneHot(a, _) | F::SumC(a, _) => combine(&[dep(a)]),
        F::Where(k, a, b) => combine(&[dep(k), dep(a), dep(b)]),
    }
}

/// Any op of functions each of `r + N` alone (or of neither) is a function of `r + N` alone.
fn combine(args: &[Dep]) -> Dep {
    let ds: Vec<Dep> = args.iter().map(|&d| through(d)).collect();
    if ds.contains(&Dep::Mixed) {
        Dep::Mixed
    } else if ds.contains(&Dep::Sum) {
        Dep::Sum
    } else {
        Dep::Indep
    }
}

/// Whether `f(r, N) = f(r + N, 0)` for every r and N: f reads r and N only through `r + N`.
pub fn through_sum(f: &F) -> bool {
    through(dep(f)) != Dep::Mixed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(f: F) -> Box<F> {
        Box::new(f)
    }

    #[test]
    fn the_rank_and_the_offset_only_through_their_sum() {
        // cumsum(mask2) - 1 + counts1 (the GShard position), compared with C
        let pos = F::Add(b(F::Add(b(F::Add(b(F::Rank), b(F::Const(1.0)))), b(F::Const(-1.0)))), b(F::Offset));
        assert!(through_sum(&pos));
        let kept = F::Cmp(super::super::Cmp::Lt, b(pos.clone()), b(F::Const(3.0)));
        assert!(through_sum(&F::Mul(b(F::OneHot(b(F::Mul(b(pos.clone()), b(kept.clone()))), 3)), b(kept))));
        // the position without the offset, or the offset counted twice
        assert!(!through_sum(&F::OneHot(b(F::Rank), 3)));
        let twice = F::Add(b(pos.clone()), b(F::Offset));
        assert!(!through_sum(&F::OneHot(b(twice), 3)));
        // 2 (r + N) is a function of r + N; r * N is not
        assert!(through_sum(&F::OneHot(b(F::Mul(b(F::Const(2.0)), b(pos.clone()))), 3)));
        assert!(!through_sum(&F::Mul(b(F::Rank), b(F::Offset))));
        // reading neither is fine (the slot check refuses a constant placement itself)
        assert!(through_sum(&F::Const(1.0)));
    }
}
