//! Rendering of user errors as `file:line:col` plus a source snippet with a caret under the span.

use miette::{
    Diagnostic, GraphicalReportHandler, GraphicalTheme, NamedSource, ThemeCharacters, ThemeStyles,
};

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

/// Renders `err` against `src` as plain text (no colour, ASCII art): the message, a
/// `[file:line:col]` header, the source lines around the span with `^` under it, and the hint.
pub fn render(err: &dyn Diagnostic, src: Option<&SourceFile>) -> String {
    let theme = GraphicalTheme {
        characters: ThemeCharacters::ascii(),
        styles: ThemeStyles::none(),
    };
    let handler = GraphicalReportHandler::new_themed(theme)
        .with_links(false)
        .with_width(100)
        .with_context_lines(1);
    let mut out = String::new();
    let wrapped;
    let diag: &dyn Diagnostic = match src {
        Some(s) => {
            wrapped = WithSource {
                inner: err,
                src: NamedSource::new(&s.name, s.text.clone()),
            };
            &wrapped
        }
        None => err,
    };
    if handler.render_report(&mut out, diag).is_err() {
        out = format!("error: {err}\n");
    }
    out
}

/// A diagnostic with its source attached, for rendering.
struct WithSource<'a> {
    inner: &'a dyn Diagnostic,
    src: NamedSource<String>,
}

impl std::fmt::Debug for WithSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.inner, f)
    }
}

impl std::fmt::Display for WithSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.inner, f)
    }
}

impl std::error::Error for WithSource<'_> {}

impl Diagnostic for WithSource<'_> {
    fn code<'b>(&'b self) -> Option<Box<dyn std::fmt::Display + 'b>> {
        self.inner.code()
    }
    fn help<'b>(&'b self) -> Option<Box<dyn std::fmt::Display + 'b>> {
        self.inner.help()
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        self.inner.labels()
    }
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.src)
    }
    fn severity(&self) -> Option<miette::Severity> {
        self.inner.severity()
    }
}
