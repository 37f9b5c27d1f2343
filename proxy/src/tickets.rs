//! TLS session tickets sealed with keys from files (`[proxy.tls]
//! ticket_keys`), so replicas given the same files resume each other's
//! clients, as nginx's `ssl_session_ticket_key`, Envoy's
//! `session_ticket_keys` and HAProxy's `tls-ticket-keys`.
//!
//! A file holds 80 random bytes (`openssl rand 80`, nginx's format): the
//! first 16 name the key (a ticket carries the name of the key that
//! sealed it), the last 32 are an AES-256-GCM key (the 32 between are
//! nginx's HMAC key, which an AEAD does not need). The first file seals,
//! every one opens: an operator rotates by listing a new key first and
//! keeping the old one second for a ticket's lifetime.
//!
//! A ticket is `name (16) | nonce (12) | sealed (sealing time, 8 bytes, and
//! rustls's session)`, the nonce random. Two things are bound in as the
//! seal's additional data, beside the name: the digest of the client CA
//! and revocation list files in force, so that a change of them ends every
//! session sealed before it (a client a new list revokes is refused at its
//! next connection, here and on every replica that took the same list);
//! and the sealing time is checked on opening, so a ticket lives
//! [`LIFETIME`] however long its key stays listed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::tls::TlsError;

/// Bytes in a key file.
pub const KEY_FILE_LEN: usize = 80;
/// Bytes of a key's name.
const NAME_LEN: usize = 16;
/// Bytes of the sealing time.
const TIME_LEN: usize = 8;
/// How long a ticket resumes a session, as rustls's own ticketer's.
pub const LIFETIME: u32 = 12 * 60 * 60;
/// A ticket sealed this far in the future (another replica's clock) still
/// opens.
const SKEW: u64 = 60;

/// A key file's bytes.
pub type KeyBytes = [u8; KEY_FILE_LEN];

/// Reads `paths`, each [`KEY_FILE_LEN`] bytes, no two with one name:
/// their keys, in order, and a digest of them all. Blocking.
pub fn read(paths: &[PathBuf]) -> Result<(Vec<KeyBytes>, u64), TlsError> {
    let mut keys: Vec<KeyBytes> = Vec::with_capacity(paths.len());
    let mut digest = 0;
    for path in paths {
        let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.clone(),
            source,
        })?;
        let key = key_of(path, &bytes)?;
        if let Some(j) = keys.iter().position(|k| k[..NAME_LEN] == key[..NAME_LEN]) {
            return Err(TlsError::Pem {
                path: path.clone(),
                what: format!(
                    "its first {NAME_LEN} bytes (the key's name) are those of {}: a ticket would open with the first only; make each key with `openssl rand {KEY_FILE_LEN}`{}",
                    paths[j].display(),
                    if key == keys[j] { " (the same key twice?)" } else { "" }
                ),
            });
        }
        digest = xxh3_64_with_seed(&key, digest);
        keys.push(key);
    }
    Ok((keys, digest))
}

/// A file's bytes as a key, or why not.
fn key_of(path: &Path, bytes: &[u8]) -> Result<KeyBytes, TlsError> {
    KeyBytes::try_from(bytes).map_err(|_| TlsError::Pem {
        path: path.to_path_buf(),
        what: format!(
            "a ticket key file holds {KEY_FILE_LEN} random bytes (`openssl rand {KEY_FILE_LEN} > FILE`), this one {}",
            bytes.len()
        ),
    })
}

/// The ticketer for `keys` (none: rustls's, a random key of its own
/// rotated every 6 hours) binding `context` (the client CA and revocation
/// list files' digest, 0 without them) into its tickets.
pub fn ticketer(
    keys: &[KeyBytes],
    context: u64,
) -> Result<Arc<dyn ProducesTickets>, rustls::Error> {
    if keys.is_empty() {
        return rustls::crypto::aws_lc_rs::Ticketer::new();
    }
    Ok(Arc::new(Shared::new(keys, context)?))
}

/// No tickets (`[proxy.tls] session_tickets = false`): the client is told
/// none are given, and one it offers is not opened.
#[derive(Debug)]
pub struct NoTickets;

impl ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }

    fn lifetime(&self) -> u32 {
        0
    }

    fn encrypt(&self, _plain: &[u8]) -> Option<Vec<u8>> {
        None
    }

    fn decrypt(&self, _cipher: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// Tickets sealed with keys from files (see the module's doc).
#[derive(Debug)]
struct Shared {
    /// Each key's name and key: the first seals, all open.
    keys: Vec<([u8; NAME_LEN], LessSafeKey)>,
    /// The client CA and revocation list files' digest, bound into every
    /// ticket.
    context: [u8; 8],
    random: SystemRandom,
}

impl Shared {
    /// Sealing with the first of `keys`, opening with any, binding
    /// `context`.
    fn new(keys: &[KeyBytes], context: u64) -> Result<Shared, rustls::Error> {
        let keys = keys
            .iter()
            .map(|k| {
                let mut name = [0; NAME_LEN];
                name.copy_from_slice(&k[..NAME_LEN]);
                let aes = UnboundKey::new(&AES_256_GCM, &k[KEY_FILE_LEN - 32..]).map_err(|_| {
                    rustls::Error::General("ticket key refused by AES-256-GCM".into())
                })?;
                Ok((name, LessSafeKey::new(aes)))
            })
            .collect::<Result<_, rustls::Error>>()?;
        Ok(Shared {
            keys,
            context: context.to_be_bytes(),
            random: SystemRandom::new(),
        })
    }

    /// The additional data a ticket of the key `name` is sealed with.
    fn aad(&self, name: &[u8; NAME_LEN]) -> [u8; NAME_LEN + 8] {
        let mut aad = [0; NAME_LEN + 8];
        aad[..NAME_LEN].copy_from_slice(name);
        aad[NAME_LEN..].copy_from_slice(&self.context);
        aad
    }

    /// Seals `plain` at `now` (Unix seconds).
    fn seal(&self, plain: &[u8], now: u64) -> Option<Vec<u8>> {
        let (name, key) = self.keys.first()?;
        let mut nonce = [0; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let mut sealed = Vec::with_capacity(TIME_LEN + plain.len() + 16);
        sealed.extend_from_slice(&now.to_be_bytes());
        sealed.extend_from_slice(plain);
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(self.aad(name)),
            &mut sealed,
        )
        .ok()?;
        let mut ticket = Vec::with_capacity(NAME_LEN + NONCE_LEN + sealed.len());
        ticket.extend_from_slice(name);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    /// Opens `ticket` at `now`: its session, if a listed key sealed it
    /// under this context within [`LIFETIME`].
    fn open(&self, ticket: &[u8], now: u64) -> Option<Vec<u8>> {
        let (name, rest) = ticket.split_at_checked(NAME_LEN)?;
        let (nonce, sealed) = rest.split_at_checked(NONCE_LEN)?;
        let (name, key) = self.keys.iter().find(|(n, _)| n[..] == *name)?;
        let mut sealed = sealed.to_vec();
        let plain = key
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).ok()?,
                Aad::from(self.aad(name)),
                &mut sealed,
            )
            .ok()?;
        let (time, session) = plain.split_at_checked(TIME_LEN)?;
        let sealed_at = u64::from_be_bytes(time.try_into().ok()?);
        let fresh = sealed_at <= now + SKEW && now.saturating_sub(sealed_at) <= u64::from(LIFETIME);
        fresh.then(|| session.to_vec())
    }
}

impl ProducesTickets for Shared {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(plain, crate::clock::unix_now())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open(cipher, crate::clock::unix_now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(fill: u8) -> KeyBytes {
        let mut k = [fill; KEY_FILE_LEN];
        k[0] = fill.wrapping_add(1);
        k
    }

    fn shared(keys: &[KeyBytes], context: u64) -> Shared {
        Shared::new(keys, context).expect("keys")
    }

    #[test]
    fn a_ticket_opens_under_any_listed_key_and_context_it_was_sealed_with() {
        let (a, b) = (key(1), key(2));
        let now = 1_800_000_000;
        let sealed = shared(&[a], 7).seal(b"session", now).expect("sealed");
        assert_ne!(&sealed[NAME_LEN + NONCE_LEN..], b"session");
        // The same key, on another replica or after a rotation put it second.
        assert_eq!(
            shared(&[a], 7).open(&sealed, now + 5).as_deref(),
            Some(&b"session"[..])
        );
        assert_eq!(
            shared(&[b, a], 7).open(&sealed, now).as_deref(),
            Some(&b"session"[..])
        );
        // A key no longer listed, another context (the client CAs or lists
        // changed), a changed byte: nothing.
        assert_eq!(shared(&[b], 7).open(&sealed, now), None);
        assert_eq!(shared(&[a], 8).open(&sealed, now), None);
        for i in [0, NAME_LEN, NAME_LEN + NONCE_LEN, sealed.len() - 1] {
            let mut bent = sealed.clone();
            bent[i] ^= 1;
            assert_eq!(shared(&[a], 7).open(&bent, now), None, "byte {i}");
        }
        assert_eq!(shared(&[a], 7).open(&sealed[..NAME_LEN + 3], now), None);
    }

    #[test]
    fn a_ticket_lives_its_lifetime_whatever_its_keys() {
        let a = key(3);
        let now = 1_800_000_000;
        let t = shared(&[a], 0);
        let sealed = t.seal(b"s", now).expect("sealed");
        assert!(t.open(&sealed, now + u64::from(LIFETIME)).is_some());
        assert!(t.open(&sealed, now + u64::from(LIFETIME) + 1).is_none());
        // Sealed by a replica whose clock is a little ahead: still good.
        assert!(t.open(&sealed, now - SKEW).is_some());
        assert!(t.open(&sealed, now - SKEW - 1).is_none());
        // Two tickets of one session differ (a fresh nonce each).
        assert_ne!(t.seal(b"s", now), t.seal(b"s", now));
    }

    #[test]
    fn a_key_file_is_80_bytes() {
        let dir = tempfile::tempdir().expect("dir");
        let good = dir.path().join("good.key");
        let short = dir.path().join("short.key");
        std::fs::write(&good, key(4)).expect("write");
        std::fs::write(&short, [0u8; 48]).expect("write");
        let (keys, digest) = read(std::slice::from_ref(&good)).expect("read");
        assert_eq!(keys, [key(4)]);
        let second = dir.path().join("second.key");
        std::fs::write(&second, key(5)).expect("write");
        let (_, other) = read(&[good.clone(), second.clone()]).expect("read");
        assert_ne!(digest, other);
        // Two files naming their keys alike: refused, whichever keys follow.
        let e = read(&[good.clone(), good.clone()])
            .expect_err("twice")
            .to_string();
        assert!(
            e.contains("the key's name") && e.contains("the same key twice"),
            "{e}"
        );
        let mut alike = key(6);
        alike[..NAME_LEN].copy_from_slice(&key(4)[..NAME_LEN]);
        std::fs::write(&second, alike).expect("write");
        let e = read(&[good.clone(), second])
            .expect_err("one name")
            .to_string();
        assert!(e.contains("good.key") && !e.contains("twice"), "{e}");
        let e = read(&[good, short]).expect_err("48 bytes").to_string();
        assert!(
            e.contains("80 random bytes") && e.contains("this one 48"),
            "{e}"
        );
        let e = read(&[dir.path().join("missing.key")])
            .expect_err("missing")
            .to_string();
        assert!(e.contains("missing.key"), "{e}");
    }
}
