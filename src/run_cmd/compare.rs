//! `--check`'s comparison of a sharded output with the reference, as numpy's `allclose`:
//! `|got - want| <= atol + rtol * |want|` element by element, equal infinities close, NaN close
//! to nothing (to NaN with `--equal-nan`); integers compared exactly.

use std::fmt;
use tpc::exec::Tensor;

/// The tolerances of `--check`.
pub struct Tolerance {
    /// Relative tolerance (times |reference|).
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// NaN equals NaN.
    pub equal_nan: bool,
}

/// How an output compares with the reference.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Every element is close; the largest errors over the finite elements.
    Close {
        /// Max |got - want|.
        max_abs: f64,
        /// Max |got - want| / |want| over nonzero `want`.
        max_rel: f64,
        /// Integers, compared exactly.
        exact: bool,
        /// Elements close only within `NOISE_FACTOR` times their own rounding sensitivity.
        within_noise: u64,
    },
    /// Some elements are not close.
    Differ {
        /// How many elements differ.
        count: u64,
        /// How many elements there are.
        total: u64,
        /// The first that differs: index, value, reference value.
        first: (Vec<usize>, String, String),
        /// Max |got - want| over the finite elements (floats only).
        max_abs: Option<f64>,
    },
    /// The arrays cannot be compared element by element.
    Mismatch(String),
}

impl Verdict {
    /// True when every element is close.
    pub fn is_close(&self) -> bool {
        matches!(self, Verdict::Close { .. })
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Close { exact: true, .. } => {
                write!(f, "equal (integers, compared exactly) ok")
            }
            Verdict::Close {
                max_abs,
                max_rel,
                within_noise,
                ..
            } => {
                write!(
                    f,
                    "max abs error {max_abs:.3e}, max rel error {max_rel:.3e}"
                )?;
                if *within_noise > 0 {
                    write!(
                        f,
                        " ({within_noise} elements beyond the tolerance, within \
                         {NOISE_FACTOR}x their rounding sensitivity)"
                    )?;
                }
                write!(f, " ok")
            }
            Verdict::Differ {
                count,
                total,
                first: (at, got, want),
                max_abs,
            } => {
                write!(
                    f,
                    "FAILED: {count} of {total} elements differ; the first at {}: got {got}, \
                     reference {want}",
                    index(at)
                )?;
                // A 0 here would read as "no error": shown only when it says something.
                match max_abs {
                    Some(m) if *m > 0.0 => {
                        write!(f, " (max abs error over the finite elements {m:.3e})")
                    }
                    _ => Ok(()),
                }
            }
            Verdict::Mismatch(m) => write!(f, "FAILED: {m}"),
        }
    }
}

/// How many times an element's rounding sensitivity (its move in the perturbed reference) it
/// may differ beyond the tolerance.
pub const NOISE_FACTOR: f64 = 10.0;

/// Compares `got` with the reference `want`.
pub fn compare(got: &Tensor, want: &Tensor, tol: &Tolerance) -> Verdict {
    compare_noisy(got, want, None, tol)
}

/// Compares `got` with the reference `want`; with `noisy` (the same values from a reference
/// run perturbed at rounding level), a float element may also differ by up to `NOISE_FACTOR`
/// times its move there, or the root mean square of the array's moves if larger (one
/// perturbed run is one sample: an element driven by noise alone can happen to move little
/// in it). A NaN or infinite move excuses nothing.
pub fn compare_noisy(
    got: &Tensor,
    want: &Tensor,
    noisy: Option<&Tensor>,
    tol: &Tolerance,
) -> Verdict {
    if got.shape() != want.shape() {
        return Verdict::Mismatch(format!(
            "the sharded run has shape {}, the reference {}",
            index(got.shape()),
            index(want.shape())
        ));
    }
    match (got, want) {
        (Tensor::F32(g), Tensor::F32(w)) => {
            let n = noisy
                .and_then(Tensor::as_f32)
                .filter(|n| n.shape() == w.shape());
            let moves: Vec<f32> = w
                .iter()
                .enumerate()
                .map(|(i, b)| n.and_then(|n| n.as_slice()).map_or(0.0, |n| n[i] - b))
                .collect();
            let typical = rms(&moves);
            let moves = moves.into_iter().map(|m| {
                if m.is_finite() {
                    m.abs().max(typical)
                } else {
                    m
                }
            });
            let triples = g
                .iter()
                .zip(w.iter())
                .zip(moves)
                .map(|((a, b), m)| (*a, *b, m));
            floats(triples, g.shape(), tol)
        }
        (Tensor::I32(g), Tensor::I32(w)) => {
            ints(g.iter().zip(w.iter()).map(|(a, b)| (*a, *b)), g.shape())
        }
        _ => Verdict::Mismatch(format!(
            "the sharded run gave {}, the reference {}",
            got.kind(),
            want.kind()
        )),
    }
}

/// numpy's `isclose` for one pair.
fn is_close(a: f64, b: f64, tol: &Tolerance) -> bool {
    if a.is_nan() || b.is_nan() {
        return tol.equal_nan && a.is_nan() && b.is_nan();
    }
    if a == b {
        return true;
    }
    if a.is_infinite() || b.is_infinite() {
        return false;
    }
    (a - b).abs() <= tol.atol + tol.rtol * b.abs()
}

/// How many pairs differ, of how many, and the first that does (flat index and both values).
struct Tally<T> {
    count: u64,
    total: u64,
    first: Option<(usize, T, T)>,
}

impl<T: Copy> Tally<T> {
    /// Counts the pairs (value, reference) for which `differ` holds.
    fn of(pairs: impl Iterator<Item = (T, T)>, mut differ: impl FnMut(T, T) -> bool) -> Self {
        let mut t = Tally {
            count: 0,
            total: 0,
            first: None,
        };
        for (i, (a, b)) in pairs.enumerate() {
            t.total += 1;
            if differ(a, b) {
                t.count += 1;
                t.first.get_or_insert((i, a, b));
            }
        }
        t
    }

    /// `close` when no pair differs; else the failure naming the first by its index in `shape`
    /// and its values as `show` writes them.
    fn verdict(
        self,
        shape: &[usize],
        show: impl Fn(T) -> String,
        close: Verdict,
        max_abs: Option<f64>,
    ) -> Verdict {
        match self.first {
            None => close,
            Some((i, a, b)) => Verdict::Differ {
                count: self.count,
                total: self.total,
                first: (unravel(i, shape), show(a), show(b)),
                max_abs,
            },
        }
    }
}

/// The root mean square of the finite values of `v` (0 when none).
fn rms(v: &[f32]) -> f32 {
    let (sum, n) = v
        .iter()
        .filter(|m| m.is_finite())
        .fold((0f64, 0usize), |(s, n), &m| {
            (s + f64::from(m) * f64::from(m), n + 1)
        });
    if n == 0 {
        0.0
    } else {
        (sum / n as f64).sqrt() as f32
    }
}

/// Float triples (value, reference, the reference's move when perturbed).
fn floats(
    triples: impl Iterator<Item = (f32, f32, f32)>,
    shape: &[usize],
    tol: &Tolerance,
) -> Verdict {
    let (mut max_abs, mut max_rel, mut within_noise) = (0.0f64, 0.0f64, 0u64);
    // Pairs (value, 0) and (reference, its move when perturbed).
    let wide = triples.map(|(a, b, m)| ((f64::from(a), 0.0), (f64::from(b), f64::from(m))));
    let tally = Tally::of(wide, |(a, _), (b, m)| {
        if a.is_finite() && b.is_finite() {
            let d = (a - b).abs();
            max_abs = max_abs.max(d);
            if b != 0.0 {
                max_rel = max_rel.max(d / b.abs());
            }
        }
        if is_close(a, b, tol) {
            return false;
        }
        let slack = m.abs() * NOISE_FACTOR;
        let excused = a.is_finite() && b.is_finite() && slack.is_finite() && (a - b).abs() <= slack;
        within_noise += u64::from(excused);
        !excused
    });
    let close = Verdict::Close {
        max_abs,
        max_rel,
        exact: false,
        within_noise,
    };
    tally.verdict(shape, |(x, _)| show(x), close, Some(max_abs))
}

fn ints(pairs: impl Iterator<Item = (i32, i32)>, shape: &[usize]) -> Verdict {
    let close = Verdict::Close {
        max_abs: 0.0,
        max_rel: 0.0,
        exact: true,
        within_noise: 0,
    };
    Tally::of(pairs, |a, b| a != b).verdict(shape, |x| x.to_string(), close, None)
}

/// A float as the user reads it: `inf`, `-inf`, `nan`, or shortest round-trip digits.
fn show(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else {
        format!("{}", x as f32)
    }
}

/// The row-major index of flat position `i` in `shape`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut at = vec![0; shape.len()];
    for (k, &n) in shape.iter().enumerate().rev() {
        if n > 0 {
            at[k] = i % n;
            i /= n;
        }
    }
    at
}

/// `[0, 3, 1]`.
fn index(at: &[usize]) -> String {
    let parts: Vec<String> = at.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn f(v: &[f32]) -> Tensor {
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap())
    }

    const TOL: Tolerance = Tolerance {
        rtol: 1e-4,
        atol: 1e-5,
        equal_nan: false,
    };

    #[test]
    fn follows_allclose_on_non_finite_values() {
        let inf = f32::INFINITY;
        assert!(compare(&f(&[inf, -inf, 1.0]), &f(&[inf, -inf, 1.0]), &TOL).is_close());
        assert!(!compare(&f(&[inf]), &f(&[-inf]), &TOL).is_close());
        assert!(!compare(&f(&[inf]), &f(&[3e38]), &TOL).is_close());
        assert!(!compare(&f(&[f32::NAN]), &f(&[f32::NAN]), &TOL).is_close());
        assert!(!compare(&f(&[1.0]), &f(&[f32::NAN]), &TOL).is_close());
        let nan_ok = Tolerance {
            equal_nan: true,
            ..TOL
        };
        assert!(compare(&f(&[f32::NAN]), &f(&[f32::NAN]), &nan_ok).is_close());
        assert!(!compare(&f(&[1.0]), &f(&[f32::NAN]), &nan_ok).is_close());
    }

    #[test]
    fn a_failure_names_the_first_element_and_both_values() {
        let v = compare(&f(&[1.0, 2.0, f32::INFINITY]), &f(&[1.0, 2.5, 7.0]), &TOL);
        let text = v.to_string();
        assert!(
            text.starts_with(
                "FAILED: 2 of 3 elements differ; the first at [1]: got 2, reference 2.5"
            ),
            "{text}"
        );
        let v = compare(&f(&[f32::NAN]), &f(&[f32::NAN]), &TOL).to_string();
        assert!(v.contains("got nan, reference nan"), "{v}");
        assert!(!v.contains("error 0"), "{v}");
    }

    #[test]
    fn tolerance_is_relative_to_the_reference() {
        let tol = Tolerance {
            rtol: 0.1,
            atol: 0.0,
            equal_nan: false,
        };
        assert!(compare(&f(&[10.9]), &f(&[10.0]), &tol).is_close());
        assert!(!compare(&f(&[11.1]), &f(&[10.0]), &tol).is_close());
        // Not symmetric, as numpy: |1 - 10| <= 0.1 * 1 is false, and 0.1 * 10 would be true.
        assert!(!compare(&f(&[10.0]), &f(&[1.0]), &tol).is_close());
    }

    #[test]
    fn integers_compare_exactly() {
        let i = |v: &[i32]| {
            Tensor::I32(ArrayD::from_shape_vec(IxDyn(&[1, v.len()]), v.to_vec()).unwrap())
        };
        let loose = Tolerance {
            rtol: 1.0,
            atol: 10.0,
            equal_nan: false,
        };
        let v = compare(&i(&[5, 16777216]), &i(&[5, 16777217]), &loose);
        assert_eq!(
            v.to_string(),
            "FAILED: 1 of 2 elements differ; the first at [0, 1]: got 16777216, reference 16777217"
        );
        assert!(compare(&i(&[16777217]), &i(&[16777217]), &TOL).is_close());
        assert!(!compare(&i(&[1]), &f(&[1.0]), &TOL).is_close());
        assert!(!compare(&f(&[1.0, 2.0]), &f(&[1.0]), &TOL).is_close());
    }

    #[test]
    fn an_element_may_differ_within_its_rounding_sensitivity() {
        let tol = Tolerance {
            rtol: 1e-4,
            atol: 1e-5,
            equal_nan: false,
        };
        // Element 1 moved by 1e-3 in the perturbed run: 5e-3 off is within 10x of it.
        let (got, want) = (f(&[1.0, 0.105, 2.0]), f(&[1.0, 0.1, 2.0]));
        let noisy = f(&[1.0, 0.101, 2.0]);
        let v = compare_noisy(&got, &want, Some(&noisy), &tol);
        assert!(v.is_close(), "{v}");
        assert!(
            v.to_string().contains("1 elements beyond the tolerance"),
            "{v}"
        );
        // 2e-2 off is not; nor without the perturbed run.
        let far = f(&[1.0, 0.12, 2.0]);
        assert!(!compare_noisy(&far, &want, Some(&noisy), &tol).is_close());
        assert!(!compare(&got, &want, &tol).is_close());
    }

    #[test]
    fn the_arrays_typical_move_covers_an_element_that_happened_not_to_move() {
        let tol = Tolerance {
            rtol: 0.0,
            atol: 0.0,
            equal_nan: false,
        };
        // Four elements driven by noise: three moved by ~1e-3, one by nothing.
        let want = f(&[0.5, 0.5, 0.5, 0.5]);
        let noisy = f(&[0.501, 0.499, 0.501, 0.5]);
        let got = f(&[0.5, 0.5, 0.5, 0.502]);
        assert!(compare_noisy(&got, &want, Some(&noisy), &tol).is_close());
    }

    #[test]
    fn a_non_finite_move_excuses_nothing() {
        let tol = Tolerance {
            rtol: 1e-4,
            atol: 1e-5,
            equal_nan: false,
        };
        let want = f(&[1.0, 1.0]);
        let got = f(&[1.0, 2.0]);
        for n in [f32::NAN, f32::INFINITY] {
            let noisy = f(&[1.0, n]);
            assert!(!compare_noisy(&got, &want, Some(&noisy), &tol).is_close());
        }
        let nan = f(&[1.0, f32::NAN]);
        let v = compare_noisy(&nan, &want, Some(&f(&[1.0, 3.0])), &tol);
        assert!(!v.is_close(), "a NaN is never within any slack: {v}");
    }
}
