//! Rendering of user errors: `error[code]: message`, then ` --> file:line:col`, the source lines
//! of each label with `^` under the span, and the hint. Errors implement `miette::Diagnostic`
//! (code, labels, help); this renderer is plain text and deterministic, so snapshots hold it.

use crate::span::LineIndex;
use miette::Diagnostic;
use std::fmt::Write;

/// One source file as the user gave it: its display name and text.
#[derive(Clone, Debug)]
pub struct SourceFile {
    /// Name shown in diagnostics (the path as typed).
    pub name: String,
    /// Full text of the file.
    pub text: String,
}

impl SourceFile {
    /// A source file named `name` with contents `text`.
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        SourceFile {
            name: name.into(),
            text: text.into(),
        }
    }
}

/// Widest source excerpt shown on one line; longer lines are cut around the caret.
const MAX_LINE: usize = 100;

/// Renders `err` as text, with source snippets from `src` for its labels.
pub fn render(err: &dyn Diagnostic, src: Option<&SourceFile>) -> String {
    let mut out = String::new();
    let code = err.code().map(|c| c.to_string()).unwrap_or_default();
    let code = code.strip_prefix("tpc::").unwrap_or(&code).to_string();
    if code.is_empty() {
        let _ = writeln!(out, "error: {err}");
    } else {
        let _ = writeln!(out, "error[{code}]: {err}");
    }
    let mut labels: Vec<miette::LabeledSpan> =
        err.labels().map(|l| l.collect()).unwrap_or_default();
    labels.sort_by_key(|l| l.offset());
    let mut width = 1;
    if let (Some(src), false) = (src, labels.is_empty()) {
        width = snippet(&mut out, src, &labels);
    }
    if let Some(h) = err.help() {
        let _ = writeln!(out, "{} = help: {h}", " ".repeat(width));
    }
    out
}

/// Writes the location and the labelled source lines; returns the width of the line-number margin.
fn snippet(out: &mut String, src: &SourceFile, labels: &[miette::LabeledSpan]) -> usize {
    let text = &src.text;
    let index = LineIndex::new(text);
    let first = labels.iter().find(|l| l.primary()).unwrap_or(&labels[0]);
    let at = index.span(
        text,
        first.offset().min(text.len()),
        first.offset().min(text.len()),
    );
    let lines: Vec<&str> = text.split('\n').collect();
    let spans: Vec<_> = labels
        .iter()
        .map(|l| {
            let start = floor_char(text, l.offset().min(text.len()));
            let end = floor_char(text, (l.offset() + l.len()).min(text.len())).max(start);
            (
                index.span(text, start, end),
                l.label().unwrap_or("").to_string(),
            )
        })
        .collect();
    let width = spans
        .iter()
        .map(|(s, _)| s.line.to_string().len())
        .max()
        .unwrap_or(1);
    let pad = " ".repeat(width);
    let _ = writeln!(out, "{pad}--> {}:{}:{}", src.name, at.line, at.col);
    let _ = writeln!(out, "{pad} |");
    let mut last_line = 0;
    for (sp, label) in &spans {
        let line = lines
            .get(sp.line as usize - 1)
            .copied()
            .unwrap_or("")
            .trim_end_matches('\r');
        let col = sp.col as usize - 1;
        let chars: Vec<char> = line.chars().collect();
        let span_chars = text
            .get(sp.start as usize..sp.end as usize)
            .map(|s| s.split('\n').next().unwrap_or("").chars().count())
            .unwrap_or(0)
            .max(1);
        let (shown, caret_at) = window(&chars, col);
        if sp.line != last_line {
            let _ = writeln!(out, "{:>width$} | {shown}", sp.line);
            last_line = sp.line;
        }
        let carets = "^".repeat(span_chars.min(MAX_LINE));
        let sep = if label.is_empty() { "" } else { " " };
        let _ = writeln!(out, "{pad} | {}{carets}{sep}{label}", " ".repeat(caret_at));
    }
    width
}

/// The part of a line to show (at most `MAX_LINE` characters, keeping the caret visible) and
/// the caret's column inside it.
fn window(chars: &[char], col: usize) -> (String, usize) {
    let tabless = |s: &[char]| {
        s.iter()
            .map(|&c| if c == '\t' { ' ' } else { c })
            .collect::<String>()
    };
    if chars.len() <= MAX_LINE {
        return (tabless(chars), col.min(chars.len()));
    }
    let start = col
        .saturating_sub(MAX_LINE / 2)
        .min(chars.len().saturating_sub(MAX_LINE));
    let end = (start + MAX_LINE).min(chars.len());
    let mut s = String::new();
    if start > 0 {
        s.push('…');
    }
    s.push_str(&tabless(&chars[start..end]));
    if end < chars.len() {
        s.push('…');
    }
    (s, col - start + usize::from(start > 0))
}

fn floor_char(text: &str, mut i: usize) -> usize {
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The closest candidate to `name` by edit distance (a swap of two letters counts as one edit),
/// if close enough to suggest: at most a third of the name, and never all of it.
pub fn suggest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<String> {
    let len = name.chars().count();
    let limit = (len / 3).max(1);
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = edit_distance(name, c);
        if d <= limit && d < len && best.is_none_or(|(bd, bc)| d < bd || (d == bd && c < bc)) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| format!("did you mean `{c}`?"))
}

/// Optimal string alignment distance: insertions, deletions, substitutions and adjacent swaps.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::Span;

    #[derive(Debug, thiserror::Error, miette::Diagnostic)]
    #[error("bad thing")]
    #[diagnostic(code(tpc::bad), help("do better"))]
    struct E {
        #[label("here")]
        span: Span,
    }

    #[test]
    fn renders_location_snippet_and_caret() {
        let src = SourceFile::new("f.tpl", "a = 1\nbb = cc + dd\n");
        let out = render(
            &E {
                span: Span {
                    start: 11,
                    end: 18,
                    line: 2,
                    col: 6,
                },
            },
            Some(&src),
        );
        assert_eq!(out, "error[bad]: bad thing\n --> f.tpl:2:6\n  |\n2 | bb = cc + dd\n  |      ^^^^^^^ here\n  = help: do better\n");
    }

    #[test]
    fn long_lines_are_cut_around_the_caret() {
        let text = format!("{}x{}", "(".repeat(300), ")".repeat(300));
        let src = SourceFile::new("f.tpl", text);
        let out = render(
            &E {
                span: Span {
                    start: 300,
                    end: 301,
                    line: 1,
                    col: 301,
                },
            },
            Some(&src),
        );
        assert!(out.contains("--> f.tpl:1:301"));
        assert!(
            out.lines().all(|l| l.chars().count() < MAX_LINE + 20),
            "{out}"
        );
        let lines: Vec<&str> = out.lines().collect();
        let x_col = lines[3].chars().position(|c| c == 'x').unwrap();
        assert_eq!(lines[4].chars().position(|c| c == '^').unwrap(), x_col);
    }

    #[test]
    fn span_at_end_of_file_does_not_panic() {
        let src = SourceFile::new("f.tpl", "é");
        let out = render(
            &E {
                span: Span {
                    start: 1,
                    end: 9,
                    line: 1,
                    col: 2,
                },
            },
            Some(&src),
        );
        assert!(out.contains("f.tpl:1:"));
    }
}
