//! The program size limit (`MAX_PROGRAM_BYTES`), checked as each value is added to the graph.

use super::error::LowerError;
use crate::ir::{Graph, TensorType, MAX_PROGRAM_BYTES};
use crate::span::Span;

/// Checks that values of types `tys`, added to `g`, keep the program within the size limit;
/// `span` is the declaration or the op that creates them.
pub(crate) fn check_fits(g: &Graph, tys: &[TensorType], span: Span) -> Result<(), LowerError> {
    let mut total = u128::from(g.total_bytes());
    for ty in tys {
        let bytes = ty.wide_size_bytes();
        if bytes > u128::from(MAX_PROGRAM_BYTES) {
            return Err(too_large(
                format!("tensor {ty} is too large: {}", describe(ty)),
                span,
            ));
        }
        total += bytes;
        if total > u128::from(MAX_PROGRAM_BYTES) {
            return Err(too_large(
                format!(
                    "program too large: with {ty} ({bytes} bytes) its tensors take more than \
                     2^60 bytes (1 EiB) together"
                ),
                span,
            ));
        }
    }
    Ok(())
}

/// The element count and byte size of `ty`, exact even past u64.
fn describe(ty: &TensorType) -> String {
    let width = u128::from(ty.dtype.size_bytes());
    match ty.wide_numel().map(|n| (n, n.checked_mul(width))) {
        Some((n, Some(b))) => format!("{n} elements, {b} bytes"),
        _ => "more than 2^128 bytes".to_string(),
    }
}

fn too_large(message: String, span: Span) -> LowerError {
    LowerError::TooLarge { message, span }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dtype, Op};

    fn f32s(shape: &[u64]) -> TensorType {
        TensorType::new(Dtype::F32, shape.to_vec())
    }

    #[test]
    fn a_tensor_past_the_limit_is_refused_with_its_exact_size() {
        let g = Graph::new("t");
        let e = check_fits(&g, &[f32s(&[1 << 32, 1 << 32])], Span::default()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("f32[4294967296,4294967296]"), "{msg}");
        assert!(msg.contains("73786976294838206464 bytes"), "{msg}");
        let e = check_fits(
            &g,
            &[f32s(&[u64::MAX, u64::MAX, u64::MAX])],
            Span::default(),
        );
        assert!(e.unwrap_err().to_string().contains("2^128"));
        let elements_fit = f32s(&[1 << 63, 1 << 63]);
        assert_eq!(elements_fit.wide_numel(), Some(1 << 126));
        let e = check_fits(&g, &[elements_fit], Span::default()).unwrap_err();
        assert!(e.to_string().contains("more than 2^128 bytes"), "{e}");
    }

    #[test]
    fn the_limit_is_inclusive_and_counts_the_whole_program() {
        let mut g = Graph::new("t");
        let half = f32s(&[1 << 57]);
        check_fits(&g, &[half.clone(), half.clone()], Span::default()).unwrap();
        assert!(check_fits(
            &g,
            &[half.clone(), half.clone(), f32s(&[])],
            Span::default()
        )
        .is_err());
        let root = g.root();
        let op = Op::Input { name: "x".into() };
        g.add_node(op, vec![], vec![half.clone()], Span::default(), root);
        check_fits(&g, std::slice::from_ref(&half), Span::default()).unwrap();
        let e = check_fits(&g, &[half.clone(), f32s(&[1])], Span::default()).unwrap_err();
        assert!(e.to_string().contains("program too large"), "{e}");
    }
}
