//! An Ingress path and its `rewrite-target` as a route's `path_prefix` and
//! `rewrite_prefix`.
//!
//! ingress-nginx reads a path as a regex (anchored at the start,
//! case-insensitive) once `use-regex: "true"` or `rewrite-target` is set,
//! and rewrites with nginx's `rewrite PATH TARGET break;`, which replaces
//! the *whole* path when it matches. Two shapes of its documentation
//! strip or replace a prefix, and veer expresses exactly those:
//!
//! - `P(/|$)(.*)` with `T$2` (`T` ending in `/`): `path_prefix = P`,
//!   `rewrite_prefix = T` (veer matches `P` as a byte prefix, so `Px` is
//!   the route's too: noted);
//! - `P/(.*)` with `T$1`: `path_prefix = "P/"`, `rewrite_prefix = T`.
//!
//! A plain path in regex mode is its own prefix; a target without a
//! capture (`rewrite-target: /` on `/api`, which sends every path under
//! it as `/`) has no veer form and is noted, not written. Other regexes
//! are skipped with a note.

/// A path as a route takes it.
#[derive(Debug, PartialEq)]
pub(super) struct Matched {
    /// `path_prefix`.
    pub prefix: String,
    /// `rewrite_prefix`, if any.
    pub rewrite: Option<String>,
}

/// Characters that make a path a regex rather than a prefix.
const REGEX: &[char] = &[
    '(', ')', '[', ']', '{', '}', '*', '+', '|', '^', '$', '\\', '?',
];

/// Whether `p` is a prefix veer takes as it is.
fn plain(p: &str) -> bool {
    p.starts_with('/') && !p.contains(REGEX) && !p.contains(['#', ' '])
}

/// Whether `r` is a `rewrite_prefix` veer takes: a plain path of
/// visible ASCII without `.` or `..` segments.
fn rewritable(r: &str) -> bool {
    plain(r)
        && r.bytes().all(|b| b.is_ascii_graphic())
        && !r.split('/').any(|s| s == "." || s == "..")
}

/// `path` as a route's prefix and rewrite: `regex` is whether
/// ingress-nginx reads it as one, `target` its main Ingress's
/// `rewrite-target`. Notes say what differs; `Err` why it cannot be a
/// route.
pub(super) fn translate(
    path: &str,
    regex: bool,
    target: Option<&str>,
    notes: &mut Vec<String>,
) -> Result<Matched, String> {
    if !regex {
        return if path.starts_with('/') && !path.contains(['?', '#', ' ']) {
            Ok(Matched {
                prefix: path.into(),
                rewrite: None,
            })
        } else {
            Err(format!(
                "path {path:?} is not a plain path prefix (a regex without use-regex?)"
            ))
        };
    }
    if plain(path) {
        match target {
            Some(t) if !t.contains('$') => notes.push(format!(
                "rewrite-target {t:?} sends every path under {path:?} upstream as {t:?} (nginx rewrites the whole path): veer replaces prefixes only, so none is written; to strip the prefix, write the path as \"{path}(/|$)(.*)\" with \"/$2\""
            )),
            Some(t) => notes.push(format!(
                "rewrite-target {t:?} names a capture that path {path:?} does not have: not written"
            )),
            None => {}
        }
        return Ok(Matched {
            prefix: path.into(),
            rewrite: None,
        });
    }
    // The two documented shapes: the rest's capture, and the prefix.
    let (prefix, capture) = if let Some(p) = path.strip_suffix("(/|$)(.*)").filter(|p| plain(p)) {
        notes.push(format!(
            "path {path:?}: veer matches {p:?} as a byte prefix, so {p}x (not only {p}/x) is this route's too"
        ));
        (p.to_string(), "$2")
    } else if let Some(p) = path
        .strip_suffix("/(.*)")
        .filter(|p| p.is_empty() || plain(p))
    {
        (format!("{p}/"), "$1")
    } else {
        return Err(format!(
            "path {path:?} is a regex that is no prefix veer can match (it takes \"/p(/|$)(.*)\" and \"/p/(.*)\")"
        ));
    };
    let rewrite = match target {
        None => None,
        Some(t) => match t.strip_suffix(capture) {
            // `$2` is the rest after the slash: the replacement must end
            // with one for veer's rest (which starts with it) to agree.
            Some(r) if rewritable(r) && (capture == "$1" || r.ends_with('/')) => {
                Some(r.to_string())
            }
            _ => {
                notes.push(format!(
                    "rewrite-target {t:?} for path {path:?} is not \"/prefix/{capture}\": not written (the path goes upstream as it came)"
                ));
                None
            }
        },
    };
    Ok(Matched { prefix, rewrite })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(path: &str, regex: bool, target: Option<&str>) -> (Result<Matched, String>, Vec<String>) {
        let mut notes = Vec::new();
        (translate(path, regex, target, &mut notes), notes)
    }

    fn ok(prefix: &str, rewrite: Option<&str>) -> Result<Matched, String> {
        Ok(Matched {
            prefix: prefix.into(),
            rewrite: rewrite.map(Into::into),
        })
    }

    #[test]
    fn the_documented_shapes_become_prefixes_and_rewrites() {
        let (m, notes) = t("/api(/|$)(.*)", true, Some("/$2"));
        assert_eq!(m, ok("/api", Some("/")));
        assert!(notes[0].contains("byte prefix"), "{notes:?}");
        assert_eq!(
            t("/api(/|$)(.*)", true, Some("/v2/$2")).0,
            ok("/api", Some("/v2/"))
        );
        assert_eq!(
            t("/store/(.*)", true, Some("/shop/$1")).0,
            ok("/store/", Some("/shop/"))
        );
        assert_eq!(
            t("/store/(.*)", true, Some("/$1")).0,
            ok("/store/", Some("/"))
        );
        assert_eq!(t("/(.*)", true, Some("/app/$1")).0, ok("/", Some("/app/")));
        // use-regex alone: the prefix, no rewrite.
        assert_eq!(t("/api(/|$)(.*)", true, None).0, ok("/api", None));
        assert_eq!(t("/docs", true, None), (ok("/docs", None), vec![]));
        assert_eq!(t("/docs", false, None), (ok("/docs", None), vec![]));
    }

    #[test]
    fn what_has_no_veer_form_is_noted_or_skipped() {
        // The whole path replaced.
        let (m, notes) = t("/api", true, Some("/"));
        assert_eq!(m, ok("/api", None));
        assert!(notes[0].contains("rewrites the whole path"), "{notes:?}");
        // A target that would drop the slash, or names another capture.
        let (m, notes) = t("/api(/|$)(.*)", true, Some("/v2$2"));
        assert_eq!(m, ok("/api", None));
        assert!(notes.iter().any(|n| n.contains("not written")), "{notes:?}");
        assert_eq!(t("/store/(.*)", true, Some("/$2")).0, ok("/store/", None));
        assert_eq!(t("/store/(.*)", true, Some("/$1/x")).0, ok("/store/", None));
        assert_eq!(
            t("/store/(.*)", true, Some("/../$1")).0,
            ok("/store/", None)
        );
        // Other regexes, and regex text without use-regex.
        assert!(t("/user/([0-9]+)/orders", true, Some("/orders/$1"))
            .0
            .is_err());
        assert!(t("/a|/b", true, None).0.is_err());
        assert!(t("/api?x", false, None).0.is_err());
    }
}
