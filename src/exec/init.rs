//! Deterministic generation of params and inputs from a seed.
//!
//! Element `i` (row-major flat index in the *full* tensor) of leaf `name` is a pure function of
//! (name, seed, i) and the full type, through a counter-based hash:
//! `h = splitmix64(key + (i + 1)·φ)` with `key = splitmix64(fnv1a(name) ^ splitmix64(seed))`.
//! So any slice can be generated on its own (`generate_slice`) and equals the same slice of the
//! full tensor (`generate`), which is how sharded runs create their local shards.
//!
//! Distributions, with `u` uniform in [-1, 1) (24 random bits):
//! - float params of rank ≥ 2: `u / √fan_in`, `fan_in` = first dim;
//! - float params of rank ≤ 1: `0.1·u`, except names ending in `_g` (norm gains): `1 + 0.1·u`;
//! - float inputs: `u`;
//! - i32 leaves (token ids, labels), params or inputs: uniform in `[0, int_range)` (0 when
//!   `int_range` is 0).
//!
//! Floats are then rounded to the leaf dtype's precision (bf16, f16), so values are exact there.

use super::kernels::{round_bf16, round_f16};
use super::{ExecError, Tensor};
use crate::ir::{Dtype, Graph, TensorType};
use ndarray::ArrayD;
use std::collections::BTreeMap;
use std::ops::Range;

/// Which kind of leaf is generated (the distributions differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Leaf {
    /// A weight (`Op::Param`).
    Param,
    /// Optimizer state (`Op::State`): zeros.
    State,
    /// A program input (`Op::Input`).
    Input,
}

/// The golden-ratio increment of splitmix64.
const PHI: u64 = 0x9E37_79B9_7F4A_7C15;

/// The splitmix64 finalizer: a bijective 64-bit mixer.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(PHI);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a 64 of the name's bytes (stable across platforms and Rust versions).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01B3)
    })
}

/// The per-tensor stream key of `name` under `seed`.
fn stream_key(name: &str, seed: u64) -> u64 {
    splitmix64(fnv1a(name) ^ splitmix64(seed))
}

/// The 64 random bits of flat element `i` of the stream `key`.
fn bits(key: u64, i: u64) -> u64 {
    splitmix64(key.wrapping_add(i.wrapping_add(1).wrapping_mul(PHI)))
}

/// Uniform in [-1, 1) from the top 24 bits (exact in f32).
fn unit(h: u64) -> f32 {
    (h >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// How one float element is derived from its uniform `u`: `offset + scale·u`.
fn float_affine(name: &str, ty: &TensorType, kind: Leaf) -> (f32, f32) {
    match kind {
        Leaf::Input => (0.0, 1.0),
        Leaf::State => (0.0, 0.0),
        Leaf::Param if ty.rank() >= 2 => (0.0, 1.0 / (ty.shape[0].max(1) as f32).sqrt()),
        Leaf::Param if name.ends_with("_g") => (1.0, 0.1),
        Leaf::Param => (0.0, 0.1),
    }
}

/// The full tensor of leaf `name` with type `ty` (see the module doc for the distributions).
pub fn generate(name: &str, ty: &TensorType, seed: u64, kind: Leaf, int_range: u64) -> Tensor {
    let full: Vec<Range<u64>> = ty.shape.iter().map(|&d| 0..d).collect();
    fill(name, ty, seed, kind, int_range, &full)
}

/// Exactly `generate(..)` sliced by `offsets` (one range per dim), without generating the rest.
/// Ranges that do not fit the type are a `Shape` error.
pub fn generate_slice(
    name: &str,
    ty: &TensorType,
    seed: u64,
    kind: Leaf,
    int_range: u64,
    offsets: &[Range<u64>],
) -> Result<Tensor, ExecError> {
    let in_bounds = offsets.len() == ty.rank()
        && offsets
            .iter()
            .zip(&ty.shape)
            .all(|(r, &d)| r.start <= r.end && r.end <= d);
    if !in_bounds {
        let detail = format!("slice {offsets:?} out of bounds for {ty} (leaf `{name}`)");
        return Err(ExecError::shape("generate_slice", detail));
    }
    Ok(fill(name, ty, seed, kind, int_range, offsets))
}

/// Generates the box `offsets` (already checked to be within `ty.shape`).
fn fill(
    name: &str,
    ty: &TensorType,
    seed: u64,
    kind: Leaf,
    int_range: u64,
    offsets: &[Range<u64>],
) -> Tensor {
    let key = stream_key(name, seed);
    let mut idx = flat_indices(&ty.shape, offsets);
    let shape: Vec<usize> = offsets.iter().map(|r| (r.end - r.start) as usize).collect();
    if ty.dtype == Dtype::I32 {
        let f = |i| ((bits(key, i) as u128 * int_range as u128) >> 64) as i32;
        return Tensor::I32(ArrayD::from_shape_simple_fn(shape, || {
            idx.next().map_or(0, f)
        }));
    }
    let (offset, scale) = float_affine(name, ty, kind);
    let round: fn(f32) -> f32 = match ty.dtype {
        Dtype::Bf16 => round_bf16,
        Dtype::F16 => round_f16,
        Dtype::F32 | Dtype::I32 => |x| x,
    };
    let f = |i| round(offset + scale * unit(bits(key, i)));
    Tensor::F32(ArrayD::from_shape_simple_fn(shape, || {
        idx.next().map_or(0.0, f)
    }))
}

/// The row-major flat indices (in the full `shape`) of the elements of the box `ranges`,
/// in row-major order of the box.
fn flat_indices<'a>(shape: &'a [u64], ranges: &'a [Range<u64>]) -> impl Iterator<Item = u64> + 'a {
    let mut strides = vec![1u64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    let count: u64 = ranges.iter().map(|r| r.end - r.start).product();
    let mut idx: Vec<u64> = ranges.iter().map(|r| r.start).collect();
    (0..count).map(move |_| {
        let flat = idx.iter().zip(&strides).map(|(i, s)| i * s).sum();
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < ranges[d].end {
                break;
            }
            idx[d] = ranges[d].start;
        }
        flat
    })
}

/// Generates every `Param` leaf of `g` (by name) with `generate(.., Leaf::Param, int_range)`.
pub fn generate_params(g: &Graph, seed: u64, int_range: u64) -> BTreeMap<String, Tensor> {
    g.params()
        .map(|(name, v)| {
            (
                name.to_string(),
                generate(name, g.ty(v), seed, Leaf::Param, int_range),
            )
        })
        .collect()
}

/// Generates every `Input` leaf of `g` (by name) with `generate(.., Leaf::Input, int_range)`.
pub fn generate_inputs(g: &Graph, seed: u64, int_range: u64) -> BTreeMap<String, Tensor> {
    g.inputs()
        .map(|(name, v)| {
            (
                name.to_string(),
                generate(name, g.ty(v), seed, Leaf::Input, int_range),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(dtype: Dtype, shape: &[u64]) -> TensorType {
        TensorType::new(dtype, shape.to_vec())
    }

    #[test]
    fn deterministic_and_name_sensitive() {
        let ty = t(Dtype::F32, &[4, 6]);
        let a = generate("layer.0.w1", &ty, 7, Leaf::Param, 0);
        assert_eq!(a, generate("layer.0.w1", &ty, 7, Leaf::Param, 0));
        assert_ne!(a, generate("layer.1.w1", &ty, 7, Leaf::Param, 0));
        assert_ne!(a, generate("layer.0.w1", &ty, 8, Leaf::Param, 0));
        let bound = 1.0 / 2.0; // 1/sqrt(fan_in = 4)
        assert!(a.as_f32().unwrap().iter().all(|v| v.abs() <= bound));
    }

    #[test]
    fn values_are_pinned() {
        // Changing the hash or the distributions changes every generated model: do it knowingly.
        let x = generate("x", &t(Dtype::F32, &[4]), 0, Leaf::Input, 0);
        let ids = generate("tokens", &t(Dtype::I32, &[4]), 0, Leaf::Input, 1000);
        let want = [-0.3388909f32, 0.18435323, -0.057839513, -0.41225553];
        assert_eq!(x.as_f32().unwrap().as_slice().unwrap(), &want);
        assert_eq!(
            ids.as_i32().unwrap().as_slice().unwrap(),
            &[810, 821, 579, 349]
        );
    }

    #[test]
    fn distributions() {
        let g = generate("ln1_g", &t(Dtype::F32, &[64]), 1, Leaf::Param, 0);
        assert!(g.as_f32().unwrap().iter().all(|v| (0.9..1.1).contains(v)));
        let b = generate("ln1_b", &t(Dtype::F32, &[64]), 1, Leaf::Param, 0);
        assert!(b.as_f32().unwrap().iter().all(|v| v.abs() <= 0.1));
        let x = generate("x", &t(Dtype::F32, &[1000]), 1, Leaf::Input, 0);
        let x = x.as_f32().unwrap();
        assert!(x.iter().all(|v| (-1.0..1.0).contains(v)));
        assert!(x.iter().any(|&v| v > 0.9) && x.iter().any(|&v| v < -0.9));
        let ids = generate("tokens", &t(Dtype::I32, &[2, 500]), 1, Leaf::Input, 10);
        let ids = ids.as_i32().unwrap();
        assert!(ids.iter().all(|v| (0..10).contains(v)));
        assert!((0..10).all(|k| ids.iter().any(|&v| v == k)));
        let h = generate("w", &t(Dtype::Bf16, &[8, 8]), 1, Leaf::Param, 0);
        assert!(h.as_f32().unwrap().iter().all(|&v| round_bf16(v) == v));
    }

    #[test]
    fn slice_equals_slice_of_full() {
        for dtype in [Dtype::F32, Dtype::I32, Dtype::F16] {
            let ty = t(dtype, &[3, 5, 4]);
            let full = generate("emb", &ty, 3, Leaf::Param, 100);
            let ranges = [1..3, 0..5, 2..4];
            let part = generate_slice("emb", &ty, 3, Leaf::Param, 100, &ranges).unwrap();
            let want = match &full {
                Tensor::F32(a) => {
                    Tensor::F32(a.slice(ndarray::s![1..3, .., 2..4]).to_owned().into_dyn())
                }
                Tensor::I32(a) => {
                    Tensor::I32(a.slice(ndarray::s![1..3, .., 2..4]).to_owned().into_dyn())
                }
            };
            assert_eq!(part, want);
        }
        let scalar = generate("s", &t(Dtype::F32, &[]), 3, Leaf::Param, 0);
        assert_eq!(scalar.shape(), &[] as &[usize]);
        let bad = generate_slice(
            "emb",
            &t(Dtype::F32, &[1, 3]),
            3,
            Leaf::Param,
            0,
            &[0..1, 1..4],
        );
        assert!(matches!(bad, Err(ExecError::Shape { .. })));
        let empty = generate_slice(
            "emb",
            &t(Dtype::F32, &[1, 3]),
            3,
            Leaf::Param,
            0,
            &[0..1, 2..2],
        )
        .unwrap();
        assert!(empty.is_empty());
    }
}
