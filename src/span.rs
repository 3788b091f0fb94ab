//! Source locations shared by every stage: byte spans with their line and column.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A byte range `[start, end)` in one source file, with the 1-based line and column of `start`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Span {
    /// Byte offset of the first byte.
    pub start: u32,
    /// Byte offset one past the last byte.
    pub end: u32,
    /// 1-based line of `start`.
    pub line: u32,
    /// 1-based column (in characters) of `start`.
    pub col: u32,
}

impl Span {
    /// The smallest span covering both `self` and `other` (line/col of the earlier one).
    pub fn join(self, other: Span) -> Span {
        let (first, _) = if self.start <= other.start {
            (self, other)
        } else {
            (other, self)
        };
        Span {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
            line: first.line,
            col: first.col,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    /// True when the span covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

impl From<Span> for miette::SourceSpan {
    fn from(s: Span) -> Self {
        miette::SourceSpan::new((s.start as usize).into(), s.len())
    }
}

/// A span together with the name of its file; Display is `file:line:col`.
#[derive(Clone, Copy, Debug)]
pub struct Located<'a> {
    /// The file name as given on the command line.
    pub file: &'a str,
    /// The span inside that file.
    pub span: Span,
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.span.line, self.span.col)
    }
}

/// Maps byte offsets of one source text to spans with line and column.
#[derive(Clone, Debug)]
pub struct LineIndex {
    line_starts: Vec<u32>,
}

impl LineIndex {
    /// Builds the index of `text`'s line starts.
    pub fn new(text: &str) -> Self {
        let mut line_starts = vec![0u32];
        for (i, b) in text.bytes().enumerate() {
            if b == b'\n' {
                line_starts.push(i as u32 + 1);
            }
        }
        LineIndex { line_starts }
    }

    /// The span of bytes `[start, end)` of `text` (which must be the indexed text).
    pub fn span(&self, text: &str, start: usize, end: usize) -> Span {
        let line = match self.line_starts.binary_search(&(start as u32)) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let ls = self.line_starts[line] as usize;
        let col = text
            .get(ls..start)
            .map(|s| s.chars().count())
            .unwrap_or(start - ls)
            + 1;
        Span {
            start: start as u32,
            end: end as u32,
            line: line as u32 + 1,
            col: col as u32,
        }
    }
}
