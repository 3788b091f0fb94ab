//! The run-time tensor: f32 storage for every float dtype, i32 storage for `i32`.

use crate::ir::{Dtype, TensorType};
use ndarray::{ArrayD, IxDyn};

/// A dense tensor. Float dtypes (f32, bf16, f16) are held as f32; `i32` as i32.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    /// Any float dtype, computed in f32.
    F32(ArrayD<f32>),
    /// Token ids, labels and other integers.
    I32(ArrayD<i32>),
}

impl Tensor {
    /// The shape, outermost first.
    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32(a) => a.shape(),
            Tensor::I32(a) => a.shape(),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape().iter().product()
    }

    /// True when the tensor has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The storage kind's name: `"f32"` or `"i32"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Tensor::F32(_) => "f32",
            Tensor::I32(_) => "i32",
        }
    }

    /// The f32 array, if this is a float tensor.
    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Some(a),
            Tensor::I32(_) => None,
        }
    }

    /// The i32 array, if this is an integer tensor.
    pub fn as_i32(&self) -> Option<&ArrayD<i32>> {
        match self {
            Tensor::I32(a) => Some(a),
            Tensor::F32(_) => None,
        }
    }

    /// A rank-0 f32 tensor.
    pub fn scalar(v: f32) -> Tensor {
        Tensor::F32(ArrayD::from_elem(IxDyn(&[]), v))
    }

    /// True when the storage kind fits `ty.dtype` and the shape equals `ty.shape`.
    pub fn matches(&self, ty: &TensorType) -> bool {
        let kind_ok = matches!(
            (self, ty.dtype),
            (Tensor::I32(_), Dtype::I32) | (Tensor::F32(_), Dtype::F32 | Dtype::Bf16 | Dtype::F16)
        );
        kind_ok
            && self.shape().len() == ty.shape.len()
            && self
                .shape()
                .iter()
                .zip(&ty.shape)
                .all(|(&a, &b)| a as u64 == b)
    }

    /// Describes storage kind and shape, as `f32[2,3]`.
    pub fn describe(&self) -> String {
        let dims: Vec<String> = self.shape().iter().map(|d| d.to_string()).collect();
        format!("{}[{}]", self.kind(), dims.join(","))
    }
}

impl From<ArrayD<f32>> for Tensor {
    fn from(a: ArrayD<f32>) -> Self {
        Tensor::F32(a)
    }
}

impl From<ArrayD<i32>> for Tensor {
    fn from(a: ArrayD<i32>) -> Self {
        Tensor::I32(a)
    }
}
