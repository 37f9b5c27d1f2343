//! Problems in a config file, with their line and column.

use std::fmt;
use std::path::Path;

/// One problem in a config file, at a 1-based line and column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
    /// What is wrong, and what would be right.
    pub message: String,
}

impl Diagnostic {
    /// A diagnostic at a byte offset of `text`.
    pub fn at(text: &str, offset: usize, message: impl Into<String>) -> Diagnostic {
        let offset = offset.min(text.len());
        let before = text.get(..offset).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
        Diagnostic {
            line,
            col,
            message: message.into(),
        }
    }
}

/// All problems of one config file, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// Renders one `PATH:LINE:COL: message` line per problem.
    pub fn render(&self, path: &Path) -> String {
        let mut out = String::new();
        for d in &self.0 {
            out.push_str(&format!(
                "{}:{}:{}: {}\n",
                path.display(),
                d.line,
                d.col,
                d.message
            ));
        }
        out
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}:{}: {}", d.line, d.col, d.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}
