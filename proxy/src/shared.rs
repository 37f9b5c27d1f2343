//! State shared by listeners, the admin endpoint and the reloader.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use veer_control::status::StatusDoc;

use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use crate::upstream::Upstreams;

/// The outcome of the last config load, for `/status`.
#[derive(Clone, Debug)]
pub struct ReloadStatus {
    /// The config file.
    pub path: PathBuf,
    /// `"success"` or `"failure"`.
    pub last_result: &'static str,
    /// Why the last load failed, if it did.
    pub last_error: Option<String>,
    /// When the last load was attempted.
    pub last_at: SystemTime,
    /// Settings changed in the file that only a restart applies.
    pub restart_required: Vec<String>,
}

/// State shared by every part of a running proxy.
pub struct Shared {
    /// The routing snapshot; requests load it once.
    pub snapshot: ArcSwap<Snapshot>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Upstream endpoints and their pools, shared across snapshots.
    pub upstreams: Upstreams,
    /// Last reload outcome.
    reload: Mutex<ReloadStatus>,
    /// Set once listeners are bound and a valid config is loaded.
    pub ready: AtomicBool,
    /// Set when shutdown's grace is over: requests still in flight are
    /// dropped by veer from then on, not given up by their clients.
    pub grace_over: AtomicBool,
    /// The `/status` document, written by the controller only.
    pub status: ArcSwap<StatusDoc>,
    /// Why the last write of persisted state failed, if it did.
    pub state_error: Mutex<Option<String>>,
    /// Writes of persisted state under way (see [`crate::persist::save`]).
    pub state_writes: Waiting,
    /// The port `https_redirect` sends clients to: the first TLS
    /// listener's once bound (443 without one).
    pub https_port: std::sync::atomic::AtomicU16,
    /// The first TLS listener's port (`https_port` without `[proxy.tls]
    /// public_port`).
    pub tls_listen_port: std::sync::atomic::AtomicU16,
    /// The TLS listeners' certificates, shown in `/status`.
    pub certs: Option<Arc<crate::tls::Certs>>,
    /// `[admin] operators_file`'s named tokens (none without it).
    pub operators: ArcSwap<crate::token::Operators>,
    /// The admin token (`[admin] token_file`, read again when it changes;
    /// or `[state] dir`/admin.token); none (every action refused) until
    /// it is read at start.
    pub admin_token: arc_swap::ArcSwapOption<String>,
    /// The proxy listeners' connection-level settings, which a reload
    /// changes (set once they listen).
    pub edge: std::sync::OnceLock<Arc<crate::server::Edge>>,
    /// `[admin] read_token`: `/status` and `/metrics` need the token too
    /// (set at start and by each reload).
    pub read_token: AtomicBool,
}

impl Shared {
    /// Shared state around a first snapshot.
    pub fn new(
        snapshot: Snapshot,
        metrics: Arc<Metrics>,
        upstreams: Upstreams,
        path: PathBuf,
        certs: Option<Arc<crate::tls::Certs>>,
    ) -> Shared {
        Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            upstreams,
            reload: Mutex::new(ReloadStatus {
                path,
                last_result: "success",
                last_error: None,
                last_at: crate::clock::wall_now(),
                restart_required: Vec::new(),
            }),
            ready: AtomicBool::new(false),
            grace_over: AtomicBool::new(false),
            status: ArcSwap::from_pointee(StatusDoc::default()),
            state_error: Mutex::new(None),
            state_writes: Waiting::default(),
            https_port: std::sync::atomic::AtomicU16::new(443),
            tls_listen_port: std::sync::atomic::AtomicU16::new(443),
            certs,
            operators: ArcSwap::from_pointee(crate::token::Operators::default()),
            admin_token: arc_swap::ArcSwapOption::empty(),
            edge: std::sync::OnceLock::new(),
            read_token: AtomicBool::new(false),
        }
    }

    /// Why the last write of persisted state failed, if it did.
    pub fn state_error_now(&self) -> Option<String> {
        self.state_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The reload status (never locked on the request path).
    pub fn reload_status(&self) -> MutexGuard<'_, ReloadStatus> {
        match self.reload.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// Blocking file work under way that may never return (a file system
/// that stopped answering), counted so that only a bounded number of
/// threads are left waiting on it: past the bound, no more starts.
#[derive(Clone, Debug, Default)]
pub struct Waiting(Arc<AtomicUsize>);

impl Waiting {
    /// Counts a new piece of work, unless `most` are under way.
    pub fn enter(&self, most: usize) -> Option<Entered> {
        if self.0.fetch_add(1, Ordering::SeqCst) >= most {
            self.0.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Entered(self.0.clone()))
    }

    /// How many are under way.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// One piece of [`Waiting`] work, counted until dropped (when its thread
/// is done with it, or panics).
#[derive(Debug)]
pub struct Entered(Arc<AtomicUsize>);

impl Drop for Entered {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
