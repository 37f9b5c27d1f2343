//! HTTPS: rustls with HTTP/2 and HTTP/1.1 offered by ALPN, and
//! certificates (a default, and more picked by the name a client asks
//! for) that are re-read when their files change, without a restart.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::crypto::aws_lc_rs::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

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
    // The leaf must parse as clients parse it (else it is no key's
    // mismatch, as rustls would say).
    if let Err(e) = webpki::EndEntityCert::try_from(&chain[0]) {
        return Err(TlsError::Pem {
            path: cert.to_path_buf(),
            what: format!("the file's first certificate (the server's own) is not a valid X.509 certificate: {e}"),
        });
    }
    let ck = CertifiedKey::new(chain, signing);
    if let Err(e) = ck.keys_match() {
        if !matches!(
            e,
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)
        ) {
            // A chain in the wrong order is a common slip: say so.
            let belongs = ck.cert.iter().skip(1).position(|c| {
                CertifiedKey::new(vec![c.clone()], ck.key.clone())
                    .keys_match()
                    .is_ok()
            });
            let what = match belongs {
                Some(i) => format!(
                    "key does not match the file's first certificate but its certificate {}: put the server's own certificate (the leaf) first, then its issuers",
                    i + 2
                ),
                None => format!("key does not match certificate: {e}"),
            };
            return Err(TlsError::Pem {
                path: key.to_path_buf(),
                what,
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

/// `veer_tls_certificate_expiry_timestamp_seconds{certificate}`, once the
/// process's metrics are made.
pub static EXPIRY: std::sync::OnceLock<prometheus::IntGaugeVec> = std::sync::OnceLock::new();

/// Shows when the certificate in `ck` (read from `path`) expires; one
/// within 14 days (or past) is logged when first shown (a file read
/// again with the same certificate says nothing more).
pub fn show_expiry(path: &Path, ck: &CertifiedKey) {
    show_not_after(path, not_after(ck));
}

/// Shows when the first certificate in the PEM file `path` expires (a
/// certificate veer hands to a library that reads it itself: the fleet's
/// etcd client certificate); a file that cannot be read or holds none is
/// said once in the log and leaves the metric. Blocking.
pub fn show_expiry_file(path: &Path) {
    let leaf = std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|pem| {
            CertificateDer::pem_slice_iter(&pem)
                .next()
                .ok_or_else(|| "no CERTIFICATE block".to_string())?
                .map_err(|e| e.to_string())
        });
    match leaf {
        Ok(der) => show_not_after(path, leaf_not_after(&der)),
        Err(e) => {
            if EXPIRY.get().is_some_and(|g| {
                g.remove_label_values(&[path.display().to_string().as_str()])
                    .is_ok()
            }) {
                tracing::warn!(certificate = %path.display(), error = %e, "certificate not read for its expiry");
            }
        }
    }
}

/// Sets the expiry gauge of the certificate read from `path` to `t` (its
/// notAfter; None: removed); one within 14 days is logged when first set.
fn show_not_after(path: &Path, t: Option<i64>) {
    let Some(expiry) = EXPIRY.get() else { return };
    let label = path.display().to_string();
    let Some(t) = t else {
        let _ = expiry.remove_label_values(&[label.as_str()]);
        return;
    };
    let gauge = expiry.with_label_values(&[label.as_str()]);
    if gauge.get() == t {
        return;
    }
    gauge.set(t);
    if let Some(days) = expires_soon(t) {
        tracing::warn!(certificate = %label, days = format!("{days:.1}"), "TLS certificate {}: renew it", expiry_words(days));
    }
}

/// How soon a certificate with `days` left expires, in words: "expires in
/// 2.0 days", or "expired 3.5 days ago" once past (TLS clients refuse it).
pub fn expiry_words(days: f64) -> String {
    if days >= 0.0 {
        format!("expires in {days:.1} days")
    } else {
        format!("expired {:.1} days ago", -days)
    }
}

/// Logs each of [`Certs::leaf_alone`] (at start and on reload).
pub fn say_leaf_alone(certs: &Certs) {
    for (file, issuer) in certs.leaf_alone() {
        tracing::warn!(certificate = %file, issuer = %issuer, "the TLS certificate file holds no certificate of its issuer: clients that do not fetch it themselves (most but browsers) refuse the chain unless they trust that CA itself; give the full chain (fullchain.pem)");
    }
}

/// The issuer's name of `ck`'s leaf when the chain holds the leaf alone
/// and the leaf is not self-issued (see [`Certs::leaf_alone`]).
fn issuer_not_given(ck: &CertifiedKey) -> Option<String> {
    let [leaf] = ck.cert.as_slice() else {
        return None;
    };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    (cert.issuer() != cert.subject()).then(|| distinguished_name(cert.issuer()))
}

/// The days left before `not_after` (Unix seconds; negative: past) when
/// fewer than 14: soon enough to say so (as the shipped alert
/// `VeerTlsCertificateExpiresSoon` does).
pub fn expires_soon(not_after: i64) -> Option<f64> {
    let left = not_after - crate::clock::unix_now() as i64;
    (left < 14 * 86_400).then(|| left as f64 / 86_400.0)
}

/// When a chain's leaf certificate expires (its notAfter, Unix seconds).
pub fn not_after(ck: &CertifiedKey) -> Option<i64> {
    leaf_not_after(ck.cert.first()?)
}

/// When a certificate expires (its notAfter, Unix seconds).
fn leaf_not_after(der: &CertificateDer<'_>) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
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
#[derive(Debug)]
pub struct Refreshed {
    /// Certificates swapped for their files' new content.
    pub swapped: usize,
    /// Those whose files could not be read or used (each keeps its
    /// previous certificate).
    pub errors: Vec<TlsError>,
    /// `ticket_keys` read again: `Ok(true)` when they changed, an error
    /// when their files could not be read or used (the keys before stay).
    pub tickets: Result<bool, TlsError>,
}

impl Default for Refreshed {
    fn default() -> Refreshed {
        Refreshed {
            swapped: 0,
            errors: Vec::new(),
            tickets: Ok(false),
        }
    }
}

/// The TLS listeners' certificates: the default (`[proxy.tls] cert`) and
/// those picked by the name a client asks for (`[[proxy.tls.certificates]]`,
/// by the DNS names each covers: an exact name, else a wildcard one label
/// up; the first listed of two that cover a name whose key the client can
/// use, so an ECDSA and an RSA pair for the same names serve each client
/// the first it takes, as nginx's two `ssl_certificate`s). A client asking
/// for no name, or one none covers, gets the default. With `client_ca`, clients'
/// certificates are verified against it (mutual TLS). A reload that
/// changes these settings puts a new [`CertSet`] in (see
/// [`Certs::prepare`]); a handshake uses the set in force when it began.
#[derive(Debug)]
pub struct Certs {
    set: ArcSwap<CertSet>,
}

/// The certificates and client verification one `[proxy.tls]` table
/// names.
#[derive(Debug)]
pub struct CertSet {
    /// Its settings, `listen` left out (see [`certificate_settings`]).
    settings: veer_control::config::TlsSettings,
    picker: Arc<Picker>,
    /// `client_ca`, if clients' certificates are asked for.
    clients: Option<ClientCa>,
    /// The listeners' set-up (rebuilt when the client CAs or the ticket
    /// keys change).
    config: ArcSwap<ServerConfig>,
    /// `ticket_keys`' keys as last read (none: rustls's own ticketer) and
    /// the files' digest.
    tickets: Mutex<(Vec<crate::tickets::KeyBytes>, u64)>,
    /// What `/status` shows (see [`Certs::status`]).
    status: ArcSwap<veer_control::status::TlsStatus>,
}

/// The served certificates, and which a name gets.
#[derive(Debug)]
struct Picker {
    /// The default first.
    stores: Vec<CertStore>,
    /// Each name a certificate after the default covers, and the places
    /// of those that cover it, in their order.
    names: ArcSwap<HashMap<Box<str>, Vec<usize>>>,
}

/// The CAs clients' certificates are verified against, and the lists of
/// those they revoked.
#[derive(Debug)]
struct ClientCa {
    path: PathBuf,
    /// `client_crl`.
    crl: Option<PathBuf>,
    /// A client may present none.
    optional: bool,
    /// The CAs `crl` holds no list from (see [`Certs::unlisted`]).
    unlisted: Mutex<Vec<String>>,
    /// The files' digest when last used.
    digest: Mutex<u64>,
}

/// A verifier of clients' certificates.
type ClientVerifier = Arc<dyn rustls::server::danger::ClientCertVerifier>;

/// The bytes of `client_ca` and `client_crl`, and their digest.
type ClientFiles = (Vec<u8>, Option<Vec<u8>>, u64);

impl ClientCa {
    /// Reads its files. Blocking.
    fn files(&self) -> Result<ClientFiles, TlsError> {
        let (ca, mut digest) = read_one(&self.path)?;
        let crl = match &self.crl {
            Some(path) => {
                let (bytes, d) = read_one(path)?;
                digest = xxh3_64_with_seed(&d.to_le_bytes(), digest);
                Some(bytes)
            }
            None => None,
        };
        Ok((ca, crl, digest))
    }

    /// The files' digest when last used: bound into session tickets, so
    /// that a change ends every session made before it.
    fn digest(&self) -> u64 {
        *self.digest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The verifier its files' bytes make.
    fn verifier(&self, ca: &[u8], crl: Option<&[u8]>) -> Result<ClientVerifier, TlsError> {
        let crls = match (&self.crl, crl) {
            (Some(path), Some(pem)) => revocation_lists(path, pem)?,
            _ => Vec::new(),
        };
        let verifier = verifier_of(&self.path, ca, &crls, self.optional)?;
        if let Some(path) = &self.crl {
            show_next_update(path, &crls);
            let unlisted = unlisted(ca, &crls);
            for ca in &unlisted {
                tracing::warn!(ca = %ca, crl = %path.display(), "client_crl holds no revocation list from this client_ca CA: every client certificate it signed is refused (its revocation status is unknown)");
            }
            *self.unlisted.lock().unwrap_or_else(|p| p.into_inner()) = unlisted;
        }
        Ok(verifier)
    }
}

/// The subjects (RFC 4514) of the CA certificates in `ca_pem` that no
/// list in `crls` was issued by.
fn unlisted(ca_pem: &[u8], crls: &[CertificateRevocationListDer<'_>]) -> Vec<String> {
    let issuers: Vec<Vec<u8>> = crls
        .iter()
        .filter_map(|c| x509_parser::parse_x509_crl(c).ok())
        .map(|(_, c)| c.issuer().as_raw().to_vec())
        .collect();
    CertificateDer::pem_slice_iter(ca_pem)
        .filter_map(Result::ok)
        .filter_map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
            let subject = cert.subject();
            (!issuers.iter().any(|i| i == subject.as_raw())).then(|| distinguished_name(subject))
        })
        .collect()
}

impl Certs {
    /// Loads every certificate of `settings` (and its client CAs) for the
    /// first time. Blocking.
    pub fn open(settings: &veer_control::config::TlsSettings) -> Result<Certs, TlsError> {
        let set = CertSet::open(settings)?;
        ASKS_CLIENTS.store(set.clients.is_some(), std::sync::atomic::Ordering::Relaxed);
        Ok(Certs {
            set: ArcSwap::from_pointee(set),
        })
    }

    /// For a reloaded config's `settings`: None when they name the
    /// certificates and client verification in force (their files' changes
    /// are [`Certs::refresh`]'s), else everything they name, loaded, for
    /// [`Certs::install`]; an error refuses the config. Blocking.
    pub fn prepare(
        &self,
        settings: &veer_control::config::TlsSettings,
    ) -> Result<Option<Arc<CertSet>>, TlsError> {
        if self.set.load().settings == certificate_settings(settings) {
            return Ok(None);
        }
        CertSet::open(settings).map(|s| Some(Arc::new(s)))
    }

    /// Puts `set` in force: new handshakes use it. Certificates and
    /// revocation lists no longer used leave the metrics.
    pub fn install(&self, set: Arc<CertSet>) {
        ASKS_CLIENTS.store(set.clients.is_some(), std::sync::atomic::Ordering::Relaxed);
        let old = self.set.swap(set);
        let now: std::collections::HashSet<PathBuf> = self.paths().into_iter().collect();
        for s in &old.picker.stores {
            if !now.contains(&s.cert) {
                if let Some(expiry) = EXPIRY.get() {
                    let _ = expiry.remove_label_values(&[s.cert.display().to_string().as_str()]);
                }
            }
        }
        let crl = old.clients.as_ref().and_then(|c| c.crl.as_ref());
        if let (Some(crl), Some(gauge)) = (crl.filter(|c| !now.contains(*c)), CRL_NEXT_UPDATE.get())
        {
            let _ = gauge.remove_label_values(&[crl.display().to_string().as_str()]);
        }
        self.show();
    }

    /// The files watched.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.set.load().paths().map(Path::to_path_buf).collect()
    }

    /// With `client_crl`, the subjects of the `client_ca` CAs it holds no
    /// revocation list from: their clients are all refused (their status
    /// is unknown), surely a mistake; logged when the files are read.
    pub fn unlisted(&self) -> Vec<String> {
        self.set.load().unlisted()
    }

    /// Whether clients are asked for a certificate (`client_ca`).
    pub fn asks_clients(&self) -> bool {
        self.set.load().clients.is_some()
    }

    /// Re-reads the files of every certificate in force (see
    /// [`CertStore::refresh`]) and the client CAs. Blocking.
    pub fn refresh(&self) -> Refreshed {
        self.set.load().refresh()
    }

    /// Shows when each certificate expires (see [`show_expiry`]).
    pub fn show(&self) {
        for s in &self.set.load().picker.stores {
            show_expiry(&s.cert, &s.current());
        }
    }

    /// What `/status` shows of them (made when they are loaded).
    pub fn status(&self) -> Arc<veer_control::status::TlsStatus> {
        self.set.load().status.load_full()
    }

    /// The routes' hosts no certificate names (`(route, host)`): a client
    /// asking for one over TLS is given the default, which its name check
    /// refuses. A wildcard host is named by the same wildcard.
    pub fn uncovered<'a>(
        &self,
        routes: &'a [Arc<veer_control::config::Route>],
    ) -> Vec<(&'a str, &'a str)> {
        self.set.load().uncovered(routes)
    }

    /// The certificate files that hold a leaf alone, issued by another
    /// (`(file, its issuer's name)`): a client that does not fetch the
    /// intermediate CA itself (curl, Go, Java, mobile apps: most but
    /// browsers) cannot build a path to its roots and refuses it, unless
    /// it trusts that issuer itself (a private CA signing leaves
    /// directly). The usual cause: `cert.pem` given for `fullchain.pem`.
    pub fn leaf_alone(&self) -> Vec<(String, String)> {
        self.set
            .load()
            .picker
            .stores
            .iter()
            .filter_map(|s| {
                Some((
                    s.cert.display().to_string(),
                    issuer_not_given(&s.current())?,
                ))
            })
            .collect()
    }

    /// A handshake with the set-up in force.
    pub fn handshake(&self) -> Handshake {
        let set = self.set.load();
        Handshake {
            acceptor: TlsAcceptor::from(set.config.load_full()),
            asks_clients: set.clients.is_some(),
            forward_cert: set.settings.forward_client_cert,
        }
    }
}

/// Whether the TLS listeners ask clients for certificates now (the
/// certificates in force have `client_ca`).
static ASKS_CLIENTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the TLS listeners ask clients for certificates now: a
/// connection accepted before a reload set `client_ca` drops a client's
/// own `X-Forwarded-Client-Cert` too.
pub fn asks_clients_now() -> bool {
    ASKS_CLIENTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// How a TLS connection is taken (see [`Certs::handshake`]).
pub struct Handshake {
    /// An acceptor offering h2 and http/1.1.
    pub acceptor: TlsAcceptor,
    /// It asks clients for a certificate (`client_ca`).
    pub asks_clients: bool,
    /// A verified one's PEM goes upstream (`forward_client_cert`).
    pub forward_cert: bool,
}

/// `settings` without `listen` and `public_port`: what a [`CertSet`] is
/// made of.
fn certificate_settings(
    settings: &veer_control::config::TlsSettings,
) -> veer_control::config::TlsSettings {
    veer_control::config::TlsSettings {
        listen: Vec::new(),
        public_port: None,
        ..settings.clone()
    }
}

impl CertSet {
    /// Loads every certificate of `settings` (and its client CAs).
    /// Blocking.
    fn open(settings: &veer_control::config::TlsSettings) -> Result<CertSet, TlsError> {
        let mut stores = vec![CertStore::open(&settings.cert, &settings.key)?];
        for (cert, key) in &settings.certificates {
            stores.push(CertStore::open_as(cert, key, true)?);
        }
        let names = ArcSwap::from_pointee(index(&stores));
        let picker = Arc::new(Picker { stores, names });
        let (clients, verifier) = match &settings.client_ca {
            Some(path) => {
                let ca = ClientCa {
                    path: path.clone(),
                    crl: settings.client_crl.clone(),
                    optional: settings.client_auth_optional,
                    unlisted: Mutex::default(),
                    digest: Mutex::new(0),
                };
                let (pem, crl, digest) = ca.files()?;
                let verifier = ca.verifier(&pem, crl.as_deref())?;
                *ca.digest.lock().unwrap_or_else(|p| p.into_inner()) = digest;
                (Some(ca), Some(verifier))
            }
            None => (None, None),
        };
        let tickets = crate::tickets::read(&settings.ticket_keys)?;
        let context = clients.as_ref().map_or(0, ClientCa::digest);
        let config = crate::tickets::ticketer(&tickets.0, context)
            .and_then(|t| server_config(&picker, verifier, t, settings))
            .map_err(|e| TlsError::Pem {
                path: settings.cert.clone(),
                what: e.to_string(),
            })?;
        let certs = CertSet {
            settings: certificate_settings(settings),
            picker,
            clients,
            config: ArcSwap::from_pointee(config),
            tickets: Mutex::new(tickets),
            status: ArcSwap::from_pointee(Default::default()),
        };
        certs.status.store(Arc::new(certs.status_now()));
        Ok(certs)
    }

    /// The files watched.
    fn paths(&self) -> impl Iterator<Item = &Path> {
        self.picker
            .stores
            .iter()
            .flat_map(CertStore::paths)
            .chain(
                self.clients
                    .iter()
                    .flat_map(|c| std::iter::once(c.path.as_path()).chain(c.crl.as_deref())),
            )
            .chain(self.settings.ticket_keys.iter().map(PathBuf::as_path))
    }

    /// See [`Certs::unlisted`].
    fn unlisted(&self) -> Vec<String> {
        self.clients
            .as_ref()
            .map(|c| c.unlisted.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default()
    }

    /// See [`Certs::refresh`].
    fn refresh(&self) -> Refreshed {
        let mut r = Refreshed::default();
        for s in &self.picker.stores {
            match s.refresh() {
                Ok(true) => r.swapped += 1,
                Ok(false) => {}
                Err(e) => r.errors.push(e),
            }
        }
        if r.swapped > 0 {
            self.picker
                .names
                .store(Arc::new(index(&self.picker.stores)));
        }
        r.tickets = self.refresh_tickets();
        if let Some(ca) = &self.clients {
            match self.refresh_clients(ca) {
                Ok(true) => r.swapped += 1,
                Ok(false) => {}
                Err(e) => r.errors.push(e),
            }
        }
        if r.swapped > 0 {
            self.status.store(Arc::new(self.status_now()));
        }
        r
    }

    /// Re-reads the client CAs and revocation lists; a changed, valid set
    /// is used from the next handshake on.
    fn refresh_clients(&self, ca: &ClientCa) -> Result<bool, TlsError> {
        let (pem, crl, digest) = ca.files()?;
        let mut d = ca.digest.lock().unwrap_or_else(|p| p.into_inner());
        if *d == digest {
            return Ok(false);
        }
        let verifier = ca.verifier(&pem, crl.as_deref())?;
        let keys = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        let config = crate::tickets::ticketer(&keys.0, digest)
            .and_then(|t| server_config(&self.picker, Some(verifier), t, &self.settings))
            .map_err(|e| TlsError::Pem {
                path: ca.path.clone(),
                what: e.to_string(),
            })?;
        *d = digest;
        self.config.store(Arc::new(config));
        Ok(true)
    }

    /// Re-reads `ticket_keys`' files; changed, valid keys seal and open
    /// tickets from the next handshake on (a file that does not load
    /// keeps the keys before).
    fn refresh_tickets(&self) -> Result<bool, TlsError> {
        let Some(first) = self.settings.ticket_keys.first() else {
            return Ok(false);
        };
        let (keys, digest) = crate::tickets::read(&self.settings.ticket_keys)?;
        // Taken before `tickets`: refresh_clients holds the client CAs'
        // lock while it takes that one.
        let context = self.clients.as_ref().map_or(0, ClientCa::digest);
        let mut held = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        if held.1 == digest {
            return Ok(false);
        }
        let mut config = ServerConfig::clone(&self.config.load());
        config.ticketer = crate::tickets::ticketer(&keys, context).map_err(|e| TlsError::Pem {
            path: first.clone(),
            what: e.to_string(),
        })?;
        *held = (keys, digest);
        self.config.store(Arc::new(config));
        Ok(true)
    }

    /// What `/status` shows of them, made afresh.
    fn status_now(&self) -> veer_control::status::TlsStatus {
        veer_control::status::TlsStatus {
            certificates: self
                .picker
                .stores
                .iter()
                .map(|s| {
                    let ck = s.current();
                    veer_control::status::CertificateStatus {
                        file: s.cert.display().to_string(),
                        names: dns_names(&ck),
                        not_after_unix: not_after(&ck),
                    }
                })
                .collect(),
            client_ca: self.clients.as_ref().map(|c| c.path.display().to_string()),
            client_crl: self
                .clients
                .as_ref()
                .and_then(|c| c.crl.as_ref())
                .map(|p| p.display().to_string()),
            ticket_keys: self
                .settings
                .ticket_keys
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            min_version: if self.settings.tls13_only {
                "1.3"
            } else {
                "1.2"
            }
            .into(),
            session_tickets: self.settings.session_tickets,
            session_cache: self.settings.session_cache,
        }
    }

    /// See [`Certs::uncovered`].
    fn uncovered<'a>(
        &self,
        routes: &'a [Arc<veer_control::config::Route>],
    ) -> Vec<(&'a str, &'a str)> {
        let names: std::collections::HashSet<String> = self
            .picker
            .stores
            .iter()
            .flat_map(|s| dns_names(&s.current()))
            .collect();
        let covered = |host: &str| {
            names.contains(host)
                || (!host.starts_with("*.")
                    && host
                        .split_once('.')
                        .is_some_and(|(_, parent)| names.contains(&format!("*.{parent}"))))
        };
        routes
            .iter()
            .flat_map(|r| r.hosts.iter().map(move |h| (r.name.as_str(), h.as_str())))
            .filter(|(_, h)| !covered(h))
            .collect()
    }
}

impl Picker {
    /// The certificate for a client asking for `name` and offering
    /// `schemes`: of those after the default covering the name (exact
    /// before a wildcard one label up, each in their order) and then the
    /// default, the first whose key signs with one of `schemes`, else the
    /// first of them (the handshake then fails as it would have); the
    /// default when none after it covers the name.
    fn pick(
        &self,
        name: Option<&str>,
        schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let names = self.names.load();
        let (exact, wild) = name.map_or((None, None), |n| covering(&names, n));
        let mut places = exact
            .into_iter()
            .chain(wild)
            .flatten()
            .copied()
            .chain(std::iter::once(0));
        let Some(first) = places.next().filter(|&i| i != 0) else {
            return self.stores.first().map(CertStore::current);
        };
        let first = self.stores.get(first)?.current();
        // One allocation (the key's signer, dropped) a check: nothing
        // beside a handshake's signature.
        if usable(&first, schemes) {
            return Some(first);
        }
        places
            .filter_map(|i| self.stores.get(i).map(CertStore::current))
            .find(|ck| usable(ck, schemes))
            .or(Some(first))
    }
}

/// The places of the certificates named exactly `name`, and of those
/// with the wildcard one label up.
fn covering<'a>(
    names: &'a HashMap<Box<str>, Vec<usize>>,
    name: &str,
) -> (Option<&'a Vec<usize>>, Option<&'a Vec<usize>>) {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let wild = name
        .split_once('.')
        .and_then(|(_, parent)| names.get(format!("*.{parent}").as_str()));
    (names.get(name.as_str()), wild)
}

/// Whether `ck`'s key signs with one of `schemes` (a client's).
fn usable(ck: &CertifiedKey, schemes: &[rustls::SignatureScheme]) -> bool {
    ck.key.choose_scheme(schemes).is_some()
}

/// The listeners' set-up: TLS 1.3 (and 1.2 unless `tls13_only`), h2 and
/// http/1.1 by ALPN, certificates from `picker`, clients verified by
/// `clients` if given.
///
/// The listeners' cryptography is AWS-LC's (aws-lc-rs), not ring's as
/// everywhere else in veer (upstreams, etcd, webhooks): its RSA signature
/// (with an AVX-512 IFMA path, as OpenSSL's) made a new client's
/// handshake with an RSA 2048 certificate, cert-manager's default, cost
/// ~550 us of CPU instead of ring's ~830 (nginx on OpenSSL: ~700;
/// `benches/tls-resume.sh`); ECDSA costs the same with either.
///
/// Sessions resume by stateless tickets from `ticketer` (see
/// [`crate::tickets::ticketer`]), as nginx's `ssl_session_tickets` by
/// default: rustls's session cache alone holds 256 sessions (a TLS 1.3
/// handshake stores two), so past ~128 clients an ingress resumed none
/// and paid a full handshake, its signature and any revocation list's
/// check, for every new connection. A set-up made because the client CAs
/// or revocation lists changed resumes no session of the one before (a
/// new key of rustls's own, or their digest bound into the tickets), so a
/// client the new lists revoke is refused at its next connection.
///
/// With `session_tickets = false` no ticket is given (`ticketer` unused)
/// and sessions resume from the cache alone; the cache holds
/// `session_cache` sessions (HAProxy's default size, 20 000), for TLS 1.2
/// clients that resume by session ID (Java's, before JDK 13) and every
/// client when tickets are off. A set-up's cache is its own: a new one
/// (client CAs changed) resumes none of the sessions before.
fn server_config(
    picker: &Arc<Picker>,
    clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    settings: &veer_control::config::TlsSettings,
) -> Result<ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] = if settings.tls13_only {
        &[&rustls::version::TLS13]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let builder = ServerConfig::builder_with_provider(provider).with_protocol_versions(versions)?;
    let builder = match clients {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(Resolver(picker.clone())));
    cfg.ticketer = if settings.session_tickets {
        ticketer
    } else {
        Arc::new(crate::tickets::NoTickets)
    };
    cfg.session_storage = match settings.session_cache {
        0 => Arc::new(rustls::server::NoServerSessionStorage {}),
        n => rustls::server::ServerSessionMemoryCache::new(n),
    };
    // http/1.0 too, as nginx: a client offering it alone (`curl
    // --http1.0`) was refused the handshake (no_application_protocol).
    // Which protocol a connection speaks is told by its first bytes.
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    Ok(cfg)
}

/// A file's bytes and their digest.
fn read_one(path: &Path) -> Result<(Vec<u8>, u64), TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let digest = xxh3_64(&pem);
    Ok((pem, digest))
}

/// A verifier of clients' certificates against the CAs in `pem` (read
/// from `path`), refusing those `crls` revoke. rustls's revocation
/// policy, as nginx's `ssl_crl` and Envoy's: every certificate of a
/// client's chain is checked, and one whose issuer has no list is refused
/// (its status is unknown); a list past its nextUpdate is still used
/// (`veer_tls_crl_next_update_timestamp_seconds` and its alert say so).
fn verifier_of(
    path: &Path,
    pem: &[u8],
    crls: &[CertificateRevocationListDer<'static>],
    optional: bool,
) -> Result<ClientVerifier, TlsError> {
    let bad = |what: String| TlsError::Pem {
        path: path.to_path_buf(),
        what,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots
            .add(cert.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no CERTIFICATE block".into()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let builder = if optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    builder
        .with_crls(crls.iter().cloned())
        .build()
        .map_err(|e| bad(e.to_string()))
}

/// The revocation lists in `pem` (read from `path`): at least one, each
/// of them well formed.
fn revocation_lists(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bad = |what: String| TlsError::Pem {
        path: path.to_path_buf(),
        what,
    };
    let crls = CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if crls.is_empty() {
        return Err(bad("no X509 CRL block".into()));
    }
    for crl in &crls {
        if let Err(e) = x509_parser::parse_x509_crl(crl) {
            return Err(bad(format!("a revocation list that does not parse: {e}")));
        }
    }
    Ok(crls)
}

/// `veer_tls_crl_next_update_timestamp_seconds{crl}`, once the process's
/// metrics are made.
pub static CRL_NEXT_UPDATE: std::sync::OnceLock<prometheus::IntGaugeVec> =
    std::sync::OnceLock::new();

/// Shows when the first of the revocation lists in `path` is due to be
/// replaced (the earliest nextUpdate; a list without one is never due);
/// one past it is logged.
fn show_next_update(path: &Path, crls: &[CertificateRevocationListDer<'_>]) {
    let due = crls
        .iter()
        .filter_map(|c| x509_parser::parse_x509_crl(c).ok())
        .filter_map(|(_, c)| c.next_update().map(|t| t.timestamp()))
        .min();
    let label = path.display().to_string();
    if let Some(gauge) = CRL_NEXT_UPDATE.get() {
        match due {
            Some(t) => gauge.with_label_values(&[label.as_str()]).set(t),
            None => {
                let _ = gauge.remove_label_values(&[label.as_str()]);
            }
        }
    }
    if let Some(t) = due.filter(|&t| t < crate::clock::unix_now() as i64) {
        tracing::warn!(crl = %label, next_update = t, "a client certificate revocation list is past its nextUpdate: certificates revoked since are still served; fetch a new one");
    }
}

/// Each name the certificates after the first cover, and the places of
/// those that cover it, in their order.
fn index(stores: &[CertStore]) -> HashMap<Box<str>, Vec<usize>> {
    let mut names: HashMap<Box<str>, Vec<usize>> = HashMap::new();
    for (i, s) in stores.iter().enumerate().skip(1) {
        for n in dns_names(&s.current()) {
            let places = names.entry(n.into_boxed_str()).or_default();
            if !places.contains(&i) {
                places.push(i);
            }
        }
    }
    names
}

#[derive(Debug)]
struct Resolver(Arc<Picker>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.pick(hello.server_name(), hello.signature_schemes())
    }
}

/// `X-Forwarded-Client-Cert` for a verified client's chain (its leaf
/// first), in Envoy's shape: `Hash=` (the leaf's SHA-256, hex),
/// `Subject="..."` (its distinguished name, RFC 4514), then a `URI=` for
/// each URI and a `DNS=` for each DNS name of its subjectAltName; a value
/// with `,`, `;`, `=` or `"` in quotes (`"` escaped). None without a
/// leaf, or if it does not parse (it verified, so it does). With it, the
/// subject alone.
pub fn forwarded_client_cert(
    chain: &[CertificateDer<'_>],
    with_cert: bool,
) -> Option<(http::HeaderValue, String)> {
    let leaf = chain.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let hash = ring::digest::digest(&ring::digest::SHA256, leaf);
    let mut out = String::from("Hash=");
    for b in hash.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out.push_str(";Subject=");
    let subject = distinguished_name(cert.subject());
    quoted_into(&mut out, &subject);
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for (key, name) in [("URI", true), ("DNS", false)] {
            for n in &san.value.general_names {
                match (n, name) {
                    (x509_parser::extensions::GeneralName::URI(v), true)
                    | (x509_parser::extensions::GeneralName::DNSName(v), false) => {
                        out.push(';');
                        out.push_str(key);
                        out.push('=');
                        if v.contains([',', ';', '=', '"']) {
                            quoted_into(&mut out, v);
                        } else {
                            out.push_str(v);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    if with_cert {
        // The leaf's PEM, URL-encoded (all but RFC 3986's unreserved
        // characters), quoted: Envoy's `Cert=`.
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(leaf.as_ref());
        let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        out.push_str(";Cert=\"");
        for b in pem.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out.push('"');
    }
    Some((http::HeaderValue::from_str(&out).ok()?, subject))
}

/// `v` in double quotes, `"` and `\` escaped by a `\`.
fn quoted_into(out: &mut String, v: &str) {
    out.push('"');
    for c in v.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// A name as RFC 4514 writes it: its parts last first, `CN=a,O=b`, an
/// attribute by its short name (else its dotted number), special
/// characters escaped by a `\`; a value that is not text as `#` and hex.
fn distinguished_name(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut rdns = Vec::new();
    for rdn in name.iter().collect::<Vec<_>>().into_iter().rev() {
        let mut parts = Vec::new();
        for attr in rdn.iter() {
            let key = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                .map(str::to_string)
                .unwrap_or_else(|_| attr.attr_type().to_id_string());
            let value = match attr.as_str() {
                Ok(s) => escaped(s),
                Err(_) => {
                    let mut hex = String::from("#");
                    for b in attr.attr_value().data {
                        hex.push_str(&format!("{b:02x}"));
                    }
                    hex
                }
            };
            parts.push(format!("{key}={value}"));
        }
        rdns.push(parts.join("+"));
    }
    rdns.join(",")
}

/// An attribute value escaped as RFC 4514 says.
fn escaped(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        if c == '\0' {
            out.push_str("\\00");
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::expiry_words;
    use std::path::Path;

    /// A CA and a leaf it signed: (CA PEM, leaf PEM, leaf key PEM).
    fn issued() -> (String, String, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = p.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["shop.example".into()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        (ca.pem(), leaf.pem(), key.serialize_pem())
    }

    #[test]
    fn a_chain_in_the_wrong_order_or_a_bad_certificate_is_named_for_what_it_is() {
        let (ca, leaf, key) = issued();
        let parse = |chain: String| {
            super::parse(
                Path::new("c.pem"),
                Path::new("k.pem"),
                chain.as_bytes(),
                key.as_bytes(),
            )
        };
        assert!(parse(format!("{leaf}{ca}")).is_ok());
        let e = parse(format!("{ca}{leaf}")).unwrap_err().to_string();
        assert!(
            e.contains("k.pem")
                && e.contains(
                    "its certificate 2: put the server's own certificate (the leaf) first"
                ),
            "{e}"
        );
        let junk = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let e = parse(format!("{junk}{ca}")).unwrap_err().to_string();
        assert!(
            e.contains("c.pem")
                && e.contains(
                    "the file's first certificate (the server's own) is not a valid X.509"
                ),
            "{e}"
        );
        let other = issued();
        let e = parse(other.1).unwrap_err().to_string();
        assert!(e.contains("key does not match certificate"), "{e}");
    }

    #[test]
    fn a_certificate_past_its_expiry_is_said_to_have_expired() {
        assert_eq!(expiry_words(2.04), "expires in 2.0 days");
        assert_eq!(expiry_words(0.0), "expires in 0.0 days");
        assert_eq!(expiry_words(-3.5), "expired 3.5 days ago");
    }
}
