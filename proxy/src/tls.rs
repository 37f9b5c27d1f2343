//! HTTPS: rustls with HTTP/2 and HTTP/1.1 offered by ALPN, and
//! certificates (a default, and more picked by the name a client asks
//! for) that are re-read when their files change, without a restart.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use xxhash_rust::xxh3::xxh3_64;

/// Why a certificate or key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file held no usable PEM item.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
}

/// Loads a PEM chain and key into a signing key, with a digest of the
/// files. Blocking.
pub fn load(cert: &Path, key: &Path) -> Result<(CertifiedKey, u64), TlsError> {
    let (cert_pem, key_pem, digest) = read(cert, key)?;
    Ok((parse(cert, key, &cert_pem, &key_pem)?, digest))
}

/// The two files' bytes and a digest of both.
fn read(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>, u64), TlsError> {
    let cert_pem = std::fs::read(cert).map_err(|source| TlsError::Read {
        path: cert.to_path_buf(),
        source,
    })?;
    let key_pem = std::fs::read(key).map_err(|source| TlsError::Read {
        path: key.to_path_buf(),
        source,
    })?;
    let digest = xxh3_64(&[&cert_pem[..], &key_pem[..]].concat());
    Ok((cert_pem, key_pem, digest))
}

/// A PEM chain and key (read from `cert` and `key`) as a signing key.
fn parse(
    cert: &Path,
    key: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert.to_path_buf(),
            what: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: cert.to_path_buf(),
            what: "no CERTIFICATE block".into(),
        });
    }
    let private = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
        path: key.to_path_buf(),
        what: e.to_string(),
    })?;
    let signing = any_supported_type(&private).map_err(|e| TlsError::Pem {
        path: key.to_path_buf(),
        what: e.to_string(),
    })?;
    let ck = CertifiedKey::new(chain, signing);
    if let Err(e) = ck.keys_match() {
        if !matches!(
            e,
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)
        ) {
            return Err(TlsError::Pem {
                path: key.to_path_buf(),
                what: format!("key does not match certificate: {e}"),
            });
        }
    }
    Ok(ck)
}

/// The DNS names a chain's leaf certificate covers (its subjectAltName's,
/// lowercase, without a final dot; a wildcard as `*.example.com`): where
/// a client asking for a name is sent, never a check of the name (the
/// client makes that).
pub fn dns_names(ck: &CertifiedKey) -> Vec<String> {
    let Some(leaf) = ck.cert.first() else {
        return Vec::new();
    };
    let Ok(leaf) = webpki::EndEntityCert::try_from(leaf) else {
        return Vec::new();
    };
    leaf.valid_dns_names()
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
        .collect()
}

/// When a chain's leaf certificate expires (its notAfter, Unix seconds).
pub fn not_after(ck: &CertifiedKey) -> Option<i64> {
    let leaf = ck.cert.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// One certificate, swapped when its files change.
pub struct CertStore {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    digest: Mutex<u64>,
    /// Picked by the names it covers: one that covers none is refused.
    by_name: bool,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("cert", &self.cert)
            .finish()
    }
}

impl CertStore {
    /// Loads the certificate for the first time. Blocking.
    pub fn open(cert: &Path, key: &Path) -> Result<CertStore, TlsError> {
        CertStore::open_as(cert, key, false)
    }

    fn open_as(cert: &Path, key: &Path, by_name: bool) -> Result<CertStore, TlsError> {
        let (ck, digest) = load(cert, key)?;
        let store = CertStore {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: ArcSwap::from_pointee(ck),
            digest: Mutex::new(digest),
            by_name,
        };
        store.named(&store.current())?;
        Ok(store)
    }

    /// `ck` names a DNS name if this certificate is picked by name.
    fn named(&self, ck: &CertifiedKey) -> Result<(), TlsError> {
        if self.by_name && dns_names(ck).is_empty() {
            return Err(TlsError::Pem {
                path: self.cert.clone(),
                what: "the certificate names no DNS name (subjectAltName): no client asking for a name would be given it".into(),
            });
        }
        Ok(())
    }

    /// The certificate in use.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// The files watched.
    pub fn paths(&self) -> [&Path; 2] {
        [&self.cert, &self.key]
    }

    /// Re-reads the files; swaps in the new pair if it changed and is valid
    /// (files that did not change are not parsed again). Returns whether
    /// it swapped. Blocking.
    pub fn refresh(&self) -> Result<bool, TlsError> {
        let (cert_pem, key_pem, digest) = read(&self.cert, &self.key)?;
        let mut d = match self.digest.lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        if *d == digest {
            return Ok(false);
        }
        let ck = parse(&self.cert, &self.key, &cert_pem, &key_pem)?;
        self.named(&ck)?;
        *d = digest;
        self.current.store(Arc::new(ck));
        Ok(true)
    }
}

/// What [`Certs::refresh`] did.
#[derive(Debug, Default)]
pub struct Refreshed {
    /// Certificates swapped for their files' new content.
    pub swapped: usize,
    /// Those whose files could not be read or used (each keeps its
    /// previous certificate).
    pub errors: Vec<TlsError>,
}

/// The TLS listeners' certificates: the default (`[proxy.tls] cert`) and
/// those picked by the name a client asks for (`[[proxy.tls.certificates]]`,
/// by the DNS names each covers: an exact name, else a wildcard one label
/// up; the first listed of two that cover a name). A client asking for no
/// name, or one none covers, gets the default.
#[derive(Debug)]
pub struct Certs {
    /// The default first.
    stores: Vec<CertStore>,
    /// Each name a certificate after the default covers, and its place.
    names: ArcSwap<HashMap<Box<str>, usize>>,
}

impl Certs {
    /// Loads every certificate of `settings` for the first time. Blocking.
    pub fn open(settings: &veer_control::config::TlsSettings) -> Result<Certs, TlsError> {
        let mut stores = vec![CertStore::open(&settings.cert, &settings.key)?];
        for (cert, key) in &settings.certificates {
            stores.push(CertStore::open_as(cert, key, true)?);
        }
        let names = ArcSwap::from_pointee(index(&stores));
        Ok(Certs { stores, names })
    }

    /// The files watched.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.stores.iter().flat_map(CertStore::paths)
    }

    /// Re-reads every certificate's files (see [`CertStore::refresh`]).
    /// Blocking.
    pub fn refresh(&self) -> Refreshed {
        let mut r = Refreshed::default();
        for s in &self.stores {
            match s.refresh() {
                Ok(true) => r.swapped += 1,
                Ok(false) => {}
                Err(e) => r.errors.push(e),
            }
        }
        if r.swapped > 0 {
            self.names.store(Arc::new(index(&self.stores)));
        }
        r
    }

    /// Shows when each certificate expires, by its file
    /// (`veer_tls_certificate_expiry_timestamp_seconds`).
    pub fn show(&self, expiry: &prometheus::IntGaugeVec) {
        for s in &self.stores {
            let label = s.cert.display().to_string();
            match not_after(&s.current()) {
                Some(t) => {
                    expiry.with_label_values(&[label.as_str()]).set(t);
                    let left = t - crate::clock::unix_now() as i64;
                    if left < 14 * 86_400 {
                        let days = left as f64 / 86_400.0;
                        tracing::warn!(certificate = %label, days = format!("{days:.1}"), "TLS certificate expires within 14 days (negative: expired): renew it");
                    }
                }
                None => {
                    let _ = expiry.remove_label_values(&[label.as_str()]);
                }
            }
        }
    }

    /// The certificate for a client asking for `name` (SNI).
    pub fn pick(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let i = name.and_then(|n| self.find(n)).unwrap_or(0);
        self.stores.get(i).map(CertStore::current)
    }

    fn find(&self, name: &str) -> Option<usize> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let names = self.names.load();
        if let Some(&i) = names.get(name.as_str()) {
            return Some(i);
        }
        let (_, parent) = name.split_once('.')?;
        names.get(format!("*.{parent}").as_str()).copied()
    }

    /// A TLS acceptor offering h2 and http/1.1.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(cfg)))
    }
}

/// Each name the certificates after the first cover, and the place of
/// the first that covers it.
fn index(stores: &[CertStore]) -> HashMap<Box<str>, usize> {
    let mut names = HashMap::new();
    for (i, s) in stores.iter().enumerate().skip(1) {
        for n in dns_names(&s.current()) {
            names.entry(n.into_boxed_str()).or_insert(i);
        }
    }
    names
}

#[derive(Debug)]
struct Resolver(Arc<Certs>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.pick(hello.server_name())
    }
}
