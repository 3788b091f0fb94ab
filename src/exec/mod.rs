//! Execution on the CPU: numpy-exact kernels (`kernels`), the op dispatcher (`apply`), the
//! unsharded reference interpreter (`reference`) and deterministic leaf generation (`init`).
//!
//! Tensors are `Tensor::F32` or `Tensor::I32`. Every float dtype (f32, bf16, f16) is stored in
//! f32; kernels accumulate in f32 and the executor loop (`core`) rounds every result declared
//! bf16/f16 to its type, so 16-bit values are 16-bit values (as `init` and `Op::Cast` make them).

mod apply;
pub mod arrays;
pub mod checkpoint;
pub mod comm;
mod core;
mod error;
pub mod init;
pub mod kernels;
pub mod leaves;
mod micro;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod npz;
pub mod pipeline;
pub mod redistribute;
pub mod reference;
pub mod spmd;
mod tensor;
pub mod train;

pub use apply::apply;
pub use error::ExecError;
pub use tensor::Tensor;
