//! Lowering: AST to `ir::Graph`. Resolves names and dims, expands blocks, infers shapes.
