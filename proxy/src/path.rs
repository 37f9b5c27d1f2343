//! Request paths, normalised before prefix routing (RFC 3986 §6.2.2):
//! percent-encoded unreserved characters are decoded (`%41` is `A`,
//! `%2e` is `.`), runs of slashes merged into one (unless `[proxy]
//! merge_slashes = false`, as nginx's), then dot-segments are removed
//! (§5.2.4). A path that would climb above the root, or that carries an
//! encoded NUL (`%00`), is refused (400), as is a dot-segment with path
//! parameters (`..;x`, `.;`): servlet containers (Tomcat, Jetty, Spring)
//! drop a segment's `;` parameters before its dots, so to them
//! `/public/..;/admin` is `/admin`, which veer's prefix routing would
//! have sent to `/public`'s route, past `/admin`'s `allow_from`.
//! Encoded reserved characters (`%2F`, `%3F`, ...) stay encoded: they are
//! data, not structure. So `/t/../admin`, `/t/%2e%2e/admin`, `//admin`
//! and `/admin` all route, and reach the upstream, as `/admin`, and a
//! route's `path_prefix` cannot be escaped by spelling.
//!
//! The usual path has no `%`, no dot-segment and no `//`, and costs one
//! scan.

use std::borrow::Cow;

/// Why a path was refused: it climbs above the root, or it carries an
/// encoded NUL (`%00`, which nginx refuses too: a service in C, or one
/// that hands paths to the file system, reads the path as ending there),
/// or a dot-segment with path parameters (`..;`, see the module's doc).
#[derive(Debug, PartialEq, Eq)]
pub struct Escapes;

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Sets a URI's path, keeping its query (and its scheme and authority).
pub fn set_path(uri: &mut http::Uri, path: &str) -> Result<(), http::Error> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(http::uri::PathAndQuery::try_from(pq)?);
    *uri = http::Uri::from_parts(parts)?;
    Ok(())
}

/// Whether `path` may need work: a `%`, a `.` segment, or (`merge`)
/// two slashes in a row.
fn needs_work(path: &str, merge: bool) -> bool {
    let b = path.as_bytes();
    b.contains(&b'%')
        || b.windows(2)
            .any(|w| w[0] == b'/' && (w[1] == b'.' || (merge && w[1] == b'/')))
        || path == "."
        || path == ".."
}

/// Decodes `%XX` that stand for unreserved characters; others stay.
fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = h * 16 + l;
                if unreserved(c) {
                    out.push(char::from(c));
                    i += 3;
                    continue;
                }
                // Keep it encoded, in upper case (§6.2.2.1).
                out.push('%');
                out.push(char::from(b[i + 1].to_ascii_uppercase()));
                out.push(char::from(b[i + 2].to_ascii_uppercase()));
                i += 3;
                continue;
            }
        }
        out.push(char::from(b[i]));
        i += 1;
    }
    out
}

/// The normalised form of an origin-form `path` (no query), or [`Escapes`]
/// when its dot-segments climb above the root; `merge`: runs of slashes
/// become one first (`/a//../b` is `/b`, as nginx and the servers that
/// merge them read it).
pub fn normalize(path: &str, merge: bool) -> Result<Cow<'_, str>, Escapes> {
    if !needs_work(path, merge) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path);
    if decoded.contains("%00") {
        return Err(Escapes);
    }
    let mut out: Vec<&str> = Vec::new();
    let absolute = decoded.starts_with('/');
    let segments: Vec<&str> = decoded.split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        if i == 0 && absolute {
            continue;
        }
        match *seg {
            "" if merge => trailing_slash = i == last,
            "." => trailing_slash = i == last,
            s if s.starts_with(".;") || s.starts_with("..;") => return Err(Escapes),
            ".." => {
                if out.pop().is_none() {
                    return Err(Escapes);
                }
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut s = String::with_capacity(decoded.len());
    if absolute {
        s.push('/');
    }
    s.push_str(&out.join("/"));
    if trailing_slash && !s.ends_with('/') {
        s.push('/');
    }
    Ok(Cow::Owned(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_or_refused() {
        let ok = [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/b/../c", "/a/c"),
            ("/t/%2e%2e/admin", "/admin"),
            ("/t/%2E%2E/admin", "/admin"),
            ("/%41dmin", "/Admin"),
            ("/a/%2fb", "/a/%2Fb"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/.hidden", "/a/.hidden"),
            ("/a/..b", "/a/..b"),
            ("/a%", "/a%"),
            ("/a%2", "/a%2"),
            ("/%7euser", "/~user"),
        ];
        for (input, want) in ok {
            assert_eq!(normalize(input, true).as_deref(), Ok(want), "{input}");
            assert_eq!(normalize(input, false).as_deref(), Ok(want), "{input}");
        }
        // Runs of slashes: merged, or kept (`merge_slashes = false`).
        let slashes = [
            ("//admin", "/admin", "//admin"),
            ("///admin//users/", "/admin/users/", "///admin//users/"),
            ("/a//../b", "/b", "/a/b"),
            ("/x/..//admin", "/admin", "//admin"),
            ("//", "/", "//"),
            ("/a/", "/a/", "/a/"),
            ("/a//", "/a/", "/a//"),
            (
                "/proxy/https://x.test/",
                "/proxy/https:/x.test/",
                "/proxy/https://x.test/",
            ),
        ];
        for (input, merged, kept) in slashes {
            assert_eq!(normalize(input, true).as_deref(), Ok(merged), "{input}");
            assert_eq!(normalize(input, false).as_deref(), Ok(kept), "{input}");
        }
        for bad in [
            "/..",
            "/../a",
            "/t/../../admin",
            "/t/../../admin/%2e%2e/x",
            "/%2e%2e/x",
            "/a%00b",
            "/a/%00/../b",
            // Dot-segments with parameters: `/admin` to a servlet container.
            "/public/..;/admin",
            "/public/..;x=1/admin",
            "/public/%2e%2e;/admin",
            "/public/.;/admin",
            "/a/b/..;",
        ] {
            assert_eq!(normalize(bad, true), Err(Escapes), "{bad}");
        }
        assert_eq!(normalize("//..", true), Err(Escapes));
        assert!(matches!(
            normalize("/plain/path", true),
            Ok(Cow::Borrowed(_))
        ));
    }

    proptest::proptest! {
        /// Normalising is idempotent, and a normalised path has no
        /// dot-segments and no encoded unreserved characters.
        #[test]
        fn normalising_twice_changes_nothing(path in "(/([a-z.]{0,3}|%2[eE]|%4[1-9]|%2[fF])){0,8}", merge: bool) {
            if let Ok(once) = normalize(&path, merge) {
                let twice = normalize(&once, merge).map(|c| c.into_owned());
                proptest::prop_assert_eq!(twice, Ok(once.clone().into_owned()));
                proptest::prop_assert!(!once.split('/').any(|s| s == "." || s == ".."), "{}", once);
                proptest::prop_assert!(!merge || !once.contains("//"), "{}", once);
            }
        }
    }
}
