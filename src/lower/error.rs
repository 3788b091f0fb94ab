//! User errors found while lowering: each carries the span it is about and renders as a snippet.

use crate::span::Span;

/// An error in the user's program found during lowering (names, dims, shapes, specs, blocks).
#[derive(Debug, Clone, PartialEq, thiserror::Error, miette::Diagnostic)]
pub enum LowerError {
    /// A name that is not bound in scope.
    #[error("unknown name `{name}`")]
    #[diagnostic(code(tpc::unknown_name))]
    UnknownName {
        /// The name.
        name: String,
        /// Where it was used.
        #[label("not defined here")]
        span: Span,
        /// Suggestion, if any.
        #[help]
        hint: Option<String>,
    },
    /// A name defined twice.
    #[error("`{name}` is already defined")]
    #[diagnostic(code(tpc::redefinition))]
    Redefinition {
        /// The name.
        name: String,
        /// The second definition.
        #[label(primary, "redefined here")]
        span: Span,
        /// The first definition.
        #[label("first defined here")]
        first: Span,
    },
    /// A second `train` statement.
    #[error("a program has at most one `train` statement")]
    #[diagnostic(
        code(tpc::second_train),
        help("one training step minimises one loss: sum the losses into one scalar")
    )]
    SecondTrain {
        /// The second statement.
        #[label(primary, "second `train`")]
        span: Span,
        /// The first one.
        #[label("first `train` here")]
        first: Span,
    },
    /// Operand shapes that do not fit the op.
    #[error("{message}")]
    #[diagnostic(code(tpc::shape_mismatch))]
    ShapeMismatch {
        /// Names the op and both shapes.
        message: String,
        /// The expression.
        #[label("{label}")]
        span: Span,
        /// Short label.
        label: String,
    },
    /// An operand of the wrong rank.
    #[error("{message}")]
    #[diagnostic(code(tpc::rank_mismatch))]
    RankMismatch {
        /// Names the op and the shape.
        message: String,
        /// The expression.
        #[label("here")]
        span: Span,
    },
    /// Operands of incompatible dtypes.
    #[error("{message}")]
    #[diagnostic(code(tpc::dtype_mismatch))]
    DtypeMismatch {
        /// Names the op and both dtypes.
        message: String,
        /// The expression.
        #[label("here")]
        span: Span,
        /// Suggestion.
        #[help]
        hint: Option<String>,
    },
    /// An op applied with bad attributes or arguments.
    #[error("{message}")]
    #[diagnostic(code(tpc::bad_op))]
    BadOp {
        /// What is wrong.
        message: String,
        /// The call or expression.
        #[label("here")]
        span: Span,
        /// Suggestion (e.g. the op's signature).
        #[help]
        hint: Option<String>,
    },
    /// A dim expression that is not a positive integer or does not divide exactly.
    #[error("bad dim expression: {message}")]
    #[diagnostic(code(tpc::bad_dim))]
    BadDim {
        /// What is wrong.
        message: String,
        /// The expression.
        #[label("here")]
        span: Span,
        /// Suggestion.
        #[help]
        hint: Option<String>,
    },
    /// A spec naming an axis that the program's `mesh` does not declare.
    #[error("unknown mesh axis `{axis}`")]
    #[diagnostic(code(tpc::unknown_axis))]
    UnknownAxis {
        /// The axis.
        axis: String,
        /// Where.
        #[label("not a declared mesh axis")]
        span: Span,
        /// The declared axes.
        #[help]
        hint: String,
    },
    /// A spec naming one axis twice.
    #[error("mesh axis `{axis}` is used twice in one sharding spec")]
    #[diagnostic(
        code(tpc::duplicate_axis),
        help("a mesh axis can split at most one dim of a tensor, once")
    )]
    DuplicateAxis {
        /// The axis.
        axis: String,
        /// The second use.
        #[label(primary, "used again here")]
        span: Span,
        /// The first use.
        #[label("first used here")]
        first: Span,
    },
    /// A spec whose length is not the tensor's rank.
    #[error("sharding spec has {got} entries but the tensor {ty} has rank {rank}")]
    #[diagnostic(
        code(tpc::spec_rank),
        help("write one entry per dim: `_` for a dim that is not split")
    )]
    SpecRank {
        /// Entries in the spec.
        got: usize,
        /// The tensor's rank.
        rank: usize,
        /// The tensor's type.
        ty: String,
        /// The spec.
        #[label("{got} entries")]
        span: Span,
    },
    /// Two different annotations on the same value.
    #[error("conflicting sharding annotations: {first_spec} and {second_spec}")]
    #[diagnostic(code(tpc::conflicting_spec))]
    ConflictingSpec {
        /// The earlier spec.
        first_spec: String,
        /// The later spec.
        second_spec: String,
        /// The later annotation.
        #[label(primary, "conflicts")]
        span: Span,
        /// The earlier annotation.
        #[label("earlier annotation")]
        first: Span,
    },
    /// A second pipelined `repeat` in one program.
    #[error("a program has at most one pipelined `repeat`")]
    #[diagnostic(
        code(tpc::second_pipeline),
        help("pipeline stages are cut from one stack of layers: put them in one `repeat`")
    )]
    SecondPipeline {
        /// The second `repeat(...) @ axis`.
        #[label(primary, "second pipelined `repeat`")]
        span: Span,
        /// The first one.
        #[label("first pipelined here")]
        first: Span,
    },
    /// `@ axis` with a mesh axis on something that is not a top-level `repeat` call.
    #[error("mesh axis `{axis}` can only split a `repeat` into pipeline stages")]
    #[diagnostic(
        code(tpc::misplaced_pipeline),
        help(
            "pipeline a stack of layers with a statement of its own, \
             `h = repeat(L, block, h) @ {axis}`; a tensor is split with a spec, `@ [_, {axis}]`"
        )
    )]
    MisplacedPipeline {
        /// The axis.
        axis: String,
        /// The operand of `@ axis`.
        #[label("{label}")]
        span: Span,
        /// What is wrong with it.
        label: String,
    },
    /// A pipelined `repeat` inside a block body.
    #[error(
        "a `repeat` can only be pipelined in the top-level program, not inside block `{block}`"
    )]
    #[diagnostic(
        code(tpc::pipeline_in_block),
        help("pipeline the repeat where the program calls the block, outside any block")
    )]
    PipelineInBlock {
        /// The enclosing block.
        block: String,
        /// The `repeat(...) @ axis`.
        #[label("pipelined inside a block")]
        span: Span,
    },
    /// The pipeline's mesh axis also written in a sharding spec.
    #[error("`{axis}` splits pipeline stages; it cannot also split a tensor")]
    #[diagnostic(
        code(tpc::pipeline_axis_in_spec),
        help("split the tensor over another mesh axis, or pipeline over another one")
    )]
    PipelineAxisInSpec {
        /// The axis.
        axis: String,
        /// Its use in the spec.
        #[label(primary, "splits a tensor here")]
        span: Span,
        /// Where the pipeline names it.
        #[label("pipeline stages over `{axis}` here")]
        pipeline: Span,
    },
    /// A block called with the wrong number of arguments.
    #[error("block `{block}` takes {expected} argument(s), got {got}")]
    #[diagnostic(code(tpc::block_arity))]
    BlockArity {
        /// The block.
        block: String,
        /// Declared arguments.
        expected: usize,
        /// Given arguments.
        got: usize,
        /// The call.
        #[label("called here")]
        span: Span,
        /// The block's signature.
        #[help]
        hint: String,
    },
    /// A block argument or result whose type differs from the declaration.
    #[error("block `{block}`: {what} has type {got}, but {expected} is declared")]
    #[diagnostic(code(tpc::block_type))]
    BlockType {
        /// The block.
        block: String,
        /// Which argument or the result.
        what: String,
        /// Declared type.
        expected: String,
        /// Actual type.
        got: String,
        /// The offending expression.
        #[label("{got}")]
        span: Span,
    },
    /// A statement that is not allowed where it stands (e.g. a dtype that does not exist).
    #[error("{message}")]
    #[diagnostic(code(tpc::invalid))]
    Invalid {
        /// What is wrong.
        message: String,
        /// Where.
        #[label("here")]
        span: Span,
        /// Suggestion.
        #[help]
        hint: Option<String>,
    },
    /// A declared or computed tensor past the program size limit (`MAX_PROGRAM_BYTES`).
    #[error("{message}")]
    #[diagnostic(
        code(tpc::too_large),
        help("a program's tensors may take at most 2^60 bytes (1 EiB) together; check the dims")
    )]
    TooLarge {
        /// The type and its size.
        message: String,
        /// The declaration or the op whose result is too large.
        #[label("too large")]
        span: Span,
    },
    /// A bad `--set NAME=VALUE` (no source span).
    #[error("bad --set: {message}")]
    #[diagnostic(code(tpc::bad_set))]
    BadSet {
        /// What is wrong.
        message: String,
        /// The known dims.
        #[help]
        hint: Option<String>,
    },
}
