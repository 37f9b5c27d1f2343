//! Reload decisions: is a file's content new, and is it valid?
//!
//! The proxy watches files and swaps snapshots; this module only decides, so
//! it can be tested without files or timers.

use std::path::Path;

use xxhash_rust::xxh3::xxh3_64;

use crate::config::{Config, Diagnostics};

/// What a reload attempt found.
#[derive(Debug)]
pub enum Outcome {
    /// Same bytes as the running config: nothing to do.
    Unchanged,
    /// A new, valid config to apply.
    Apply(Box<Config>),
    /// The new content is invalid; the running config stays.
    Rejected(Diagnostics),
}

/// Remembers the content of the running config file.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reloader {
    current: Option<u64>,
}

impl Reloader {
    /// A reloader that has applied nothing yet.
    pub fn new() -> Reloader {
        Reloader::default()
    }

    /// Judges new file content. `base` resolves relative paths. Content that
    /// is rejected is not remembered, so fixing the file back to the running
    /// content is recognised as unchanged.
    pub fn consider(&self, text: &str, base: &Path) -> Outcome {
        let digest = xxh3_64(text.as_bytes());
        if self.current == Some(digest) {
            return Outcome::Unchanged;
        }
        match Config::parse(text, base) {
            Ok(c) => Outcome::Apply(Box::new(c)),
            Err(d) => Outcome::Rejected(d),
        }
    }

    /// Records that the content was applied.
    pub fn applied(&mut self, text: &str) {
        self.current = Some(xxh3_64(text.as_bytes()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "[[route]]\nname = \"a\"\n[route.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n";

    #[test]
    fn identical_content_is_unchanged_and_bad_content_is_rejected() {
        let mut r = Reloader::new();
        assert!(matches!(
            r.consider(GOOD, Path::new("/")),
            Outcome::Apply(_)
        ));
        r.applied(GOOD);
        assert!(matches!(
            r.consider(GOOD, Path::new("/")),
            Outcome::Unchanged
        ));
        assert!(matches!(
            r.consider("[[route]]\n", Path::new("/")),
            Outcome::Rejected(_)
        ));
        assert!(matches!(
            r.consider(GOOD, Path::new("/")),
            Outcome::Unchanged
        ));
    }
}
