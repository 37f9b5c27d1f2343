//! HTTPS: rustls with HTTP/2 and HTTP/1.1 offered by ALPN, and a certificate
//! that is re-read when its files change, without a restart.

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

/// Loads a PEM chain and key into a signing key. Blocking.
pub fn load(cert: &Path, key: &Path) -> Result<(CertifiedKey, u64), TlsError> {
    let cert_pem = std::fs::read(cert).map_err(|source| TlsError::Read {
        path: cert.to_path_buf(),
        source,
    })?;
    let key_pem = std::fs::read(key).map_err(|source| TlsError::Read {
        path: key.to_path_buf(),
        source,
    })?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
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
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
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
    let digest = xxh3_64(&[cert_pem, key_pem].concat());
    Ok((ck, digest))
}

/// The current certificate, swapped when its files change.
pub struct CertStore {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    digest: Mutex<u64>,
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
        let (ck, digest) = load(cert, key)?;
        Ok(CertStore {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: ArcSwap::from_pointee(ck),
            digest: Mutex::new(digest),
        })
    }

    /// The certificate in use.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// The files watched.
    pub fn paths(&self) -> [&Path; 2] {
        [&self.cert, &self.key]
    }

    /// Re-reads the files; swaps in the new pair if it changed and is valid.
    /// Returns whether it swapped. Blocking.
    pub fn refresh(&self) -> Result<bool, TlsError> {
        let (ck, digest) = load(&self.cert, &self.key)?;
        let mut d = match self.digest.lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        if *d == digest {
            return Ok(false);
        }
        *d = digest;
        self.current.store(Arc::new(ck));
        Ok(true)
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

#[derive(Debug)]
struct Resolver(Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load_full())
    }
}
