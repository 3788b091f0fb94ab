//! Element types and tensor types.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Element type of a tensor. Compute may happen in f32, but sizes use the real width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit IEEE float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
    /// 32-bit signed integer (token ids, labels).
    I32,
}

impl Dtype {
    /// Width of one element in bytes.
    pub fn size_bytes(self) -> u64 {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    /// True for the floating-point types.
    pub fn is_float(self) -> bool {
        !matches!(self, Dtype::I32)
    }

    /// Parses `f32`, `bf16`, `f16`, `i32`.
    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "f32" => Dtype::F32,
            "bf16" => Dtype::Bf16,
            "f16" => Dtype::F16,
            "i32" => Dtype::I32,
            _ => return None,
        })
    }

    /// The source spelling.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::I32 => "i32",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The size limit of a program: the byte sizes of all its values together (each at its dtype's
/// real width) must not exceed 2^60 bytes (1 EiB). Lowering refuses a declaration or an op whose
/// result would pass it, so in a lowered graph every element count, byte size and sum of byte
/// sizes (params, live sets) fits in u64 and i64, and an element count fits in a 64-bit usize;
/// later passes rely on this and do not re-check. The headroom (2^4 below u64) covers the extra
/// copies that reshards add to a per-device program.
pub const MAX_PROGRAM_BYTES: u64 = 1 << 60;

/// A tensor's static type: element type and shape (rank 0 is a scalar).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    /// Element type.
    pub dtype: Dtype,
    /// Sizes, outermost first.
    pub shape: Vec<u64>,
}

impl TensorType {
    /// A tensor type of `dtype` and `shape`.
    pub fn new(dtype: Dtype, shape: Vec<u64>) -> Self {
        TensorType { dtype, shape }
    }

    /// Number of dims.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements (1 for a scalar); saturates at `u64::MAX` instead of wrapping (a
    /// lowered graph's types are within `MAX_PROGRAM_BYTES`, so it never saturates there).
    pub fn numel(&self) -> u64 {
        self.checked_numel().unwrap_or(u64::MAX)
    }

    /// Size in bytes at the dtype's real width; saturates like `numel`.
    pub fn size_bytes(&self) -> u64 {
        self.checked_size_bytes().unwrap_or(u64::MAX)
    }

    /// Number of elements, `None` when it does not fit in u64.
    pub fn checked_numel(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
    }

    /// Size in bytes, `None` when it does not fit in u64.
    pub fn checked_size_bytes(&self) -> Option<u64> {
        self.checked_numel()?.checked_mul(self.dtype.size_bytes())
    }

    /// Exact number of elements, even past u64; `None` when it does not fit in u128.
    pub fn wide_numel(&self) -> Option<u128> {
        self.shape
            .iter()
            .try_fold(1u128, |n, &d| n.checked_mul(u128::from(d)))
    }

    /// Exact size in bytes, even past u64 (for messages about sizes that do not fit); saturates
    /// at u128::MAX.
    pub fn wide_size_bytes(&self) -> u128 {
        let width = u128::from(self.dtype.size_bytes());
        self.wide_numel()
            .and_then(|n| n.checked_mul(width))
            .unwrap_or(u128::MAX)
    }

    /// The same dtype with another shape.
    pub fn with_shape(&self, shape: Vec<u64>) -> Self {
        TensorType {
            dtype: self.dtype,
            shape,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_never_wrap() {
        let huge = TensorType::new(Dtype::F32, vec![1 << 32, 1 << 32]);
        assert_eq!(huge.checked_numel(), None);
        assert_eq!(huge.checked_size_bytes(), None);
        assert_eq!(huge.size_bytes(), u64::MAX);
        assert_eq!(huge.numel(), u64::MAX);
        assert_eq!(huge.wide_size_bytes(), 1u128 << 66);
        let bytes_only = TensorType::new(Dtype::F32, vec![1 << 31, 1 << 32]);
        assert_eq!(bytes_only.checked_numel(), Some(1 << 63));
        assert_eq!(bytes_only.checked_size_bytes(), None);
        let ok = TensorType::new(Dtype::Bf16, vec![3, 5]);
        assert_eq!((ok.numel(), ok.size_bytes()), (15, 30));
        assert_eq!(TensorType::new(Dtype::I32, vec![]).size_bytes(), 4);
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// A sharding annotation in PartitionSpec form: for each tensor dim, the mesh axes that split it,
/// major first (`[(dp, tp), _]` is `[["dp","tp"], []]`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Spec {
    /// One entry per tensor dim; empty means not split.
    pub dims: Vec<Vec<String>>,
}

impl Spec {
    /// A spec splitting no dim of a rank-`rank` tensor.
    pub fn replicated(rank: usize) -> Self {
        Spec {
            dims: vec![Vec::new(); rank],
        }
    }

    /// True when no dim is split.
    pub fn is_replicated(&self) -> bool {
        self.dims.iter().all(|d| d.is_empty())
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, axes) in self.dims.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match axes.len() {
                0 => f.write_str("_")?,
                1 => f.write_str(&axes[0])?,
                _ => write!(f, "({})", axes.join(", "))?,
            }
        }
        f.write_str("]")
    }
}
