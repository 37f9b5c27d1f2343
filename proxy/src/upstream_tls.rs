//! TLS to upstreams: rustls client set-ups built from a version's
//! `[route.<version>.tls]`, shared by every endpoint that names the same
//! files, and a client certificate re-read when its files change.
//!
//! Verification is always on: the endpoints' certificates are checked
//! against the version's `ca_file`, or the built-in Mozilla roots.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use xxhash_rust::xxh3::xxh3_64;

use veer_control::config::UpstreamTls;

use crate::tls::CertStore;

/// How often a handshake may look at the client certificate's files.
const CERT_CHECK: Duration = Duration::from_secs(1);

/// The two client set-ups of one `[route.<version>.tls]`: one offering
/// `h2` then `http/1.1` (requests), one offering only `http/1.1` (upgrades,
/// which need an HTTP/1.1 connection).
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// ALPN `h2`, `http/1.1`.
    pub h2: Arc<ClientConfig>,
    /// ALPN `http/1.1`.
    pub h1: Arc<ClientConfig>,
    /// Identifies the set-up (CA content, client certificate paths), so
    /// that endpoints keep their pools across reloads that do not change it.
    pub id: u64,
}

/// Loads the trust roots of a `ca_file` (None: the Mozilla roots) and the
/// digest of what was loaded. Blocking.
fn roots(ca_file: Option<&Path>) -> Result<(RootCertStore, u64), String> {
    let mut roots = RootCertStore::empty();
    let Some(path) = ca_file else {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok((roots, 0));
    };
    let pem = std::fs::read(path).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("ca_file {}: no CERTIFICATE block", path.display()));
    }
    Ok((roots, xxh3_64(&pem)))
}

/// Builds the set-ups of `tls`. Blocking (reads the files).
pub fn build(tls: &UpstreamTls) -> Result<ClientTls, String> {
    let (roots, ca_digest) = roots(tls.ca_file.as_deref())?;
    let resolver = match &tls.client_cert {
        Some((cert, key)) => Some(Arc::new(Reloading::open(cert, key)?)),
        None => None,
    };
    let make = |alpn: &[&[u8]]| -> Result<Arc<ClientConfig>, String> {
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots.clone());
        let mut cfg = match &resolver {
            Some(r) => builder.with_client_cert_resolver(r.clone()),
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    };
    let mut id = format!("{ca_digest:x}");
    if let Some((c, k)) = &tls.client_cert {
        id.push_str(&format!("|{}|{}", c.display(), k.display()));
    }
    Ok(ClientTls {
        h2: make(&[b"h2", b"http/1.1"])?,
        h1: make(&[b"http/1.1"])?,
        id: xxh3_64(id.as_bytes()),
    })
}

/// Checks that every `[route.<version>.tls]` of a config loads. Blocking.
pub fn check(config: &veer_control::config::Config) -> Vec<String> {
    let mut errors = Vec::new();
    for r in &config.routes {
        for v in std::iter::once(&r.stable).chain(r.canary.as_ref()) {
            if let Some(t) = &v.tls {
                if let Err(e) = build(t) {
                    errors.push(format!("route {} version {}: {e}", r.name, v.name));
                }
            }
        }
    }
    errors
}

/// Client set-ups by their `[route.<version>.tls]`, rebuilt only when the
/// CA file's content changes, so that reloads keep the endpoints' pools.
#[derive(Default)]
pub struct TlsCache {
    by_settings: Mutex<HashMap<UpstreamTls, ClientTls>>,
}

impl TlsCache {
    /// The set-up of `tls`: the cached one if its CA is unchanged. Blocking
    /// when it has to read files (snapshot builds only).
    pub fn get(&self, tls: &UpstreamTls) -> Result<ClientTls, String> {
        let built = build(tls)?;
        let mut map = match self.by_settings.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        match map.get(tls) {
            Some(old) if old.id == built.id => Ok(old.clone()),
            _ => {
                map.insert(tls.clone(), built.clone());
                Ok(built)
            }
        }
    }
}

/// A client certificate re-read (at most once a second, on a handshake)
/// when its files change; a broken new pair keeps the previous one.
#[derive(Debug)]
struct Reloading {
    store: CertStore,
    checked: Mutex<Instant>,
    paths: (PathBuf, PathBuf),
}

impl Reloading {
    fn open(cert: &Path, key: &Path) -> Result<Reloading, String> {
        let store = CertStore::open(cert, key).map_err(|e| format!("client certificate: {e}"))?;
        crate::tls::show_expiry(cert, &store.current());
        Ok(Reloading {
            store,
            checked: Mutex::new(Instant::now()),
            paths: (cert.to_path_buf(), key.to_path_buf()),
        })
    }
}

impl ResolvesClientCert for Reloading {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let due = {
            let mut last = match self.checked.lock() {
                Ok(l) => l,
                Err(p) => p.into_inner(),
            };
            let due = last.elapsed() >= CERT_CHECK;
            if due {
                *last = Instant::now();
            }
            due
        };
        if due {
            match self.store.refresh() {
                Ok(true) => {
                    tracing::info!(cert = %self.paths.0.display(), "upstream client certificate reloaded");
                    crate::tls::show_expiry(&self.paths.0, &self.store.current());
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "upstream client certificate not reloaded; the previous one stays")
                }
            }
        }
        Some(self.store.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
