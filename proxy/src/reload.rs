//! Live reload: watch the config (and certificate) files, and swap the whole
//! routing snapshot when the config changes and is valid.
//!
//! The watch is on the files' directories, not the files: editors save by
//! rename and Kubernetes ConfigMaps swap a `..data` symlink, both of which a
//! watch on the file itself would miss. Events are debounced; SIGHUP and a
//! slow periodic check trigger the same path, which compares content, so a
//! spurious trigger costs one file read and changes nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use veer_control::config::Config;
use veer_control::reload::{Outcome, Reloader};

use crate::shared::Shared;
use crate::snapshot::{self, Snapshot};
use crate::tls::CertStore;

/// Quiet time after a file event before the reload runs.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Fallback check, for filesystems that do not report events.
const POLL: Duration = Duration::from_secs(5);

/// Applies new config files to a running proxy.
pub struct Reload {
    shared: Arc<Shared>,
    path: PathBuf,
    reloader: Reloader,
    /// The config at start: settings read only at start are compared with it.
    started: Config,
    certs: Option<Arc<CertStore>>,
}

impl Reload {
    /// A reloader for `path`, whose content `text` is running as `started`.
    pub fn new(
        shared: Arc<Shared>,
        path: PathBuf,
        text: &str,
        started: Config,
        certs: Option<Arc<CertStore>>,
    ) -> Reload {
        let mut reloader = Reloader::new();
        reloader.applied(text);
        Reload {
            shared,
            path,
            reloader,
            started,
            certs,
        }
    }

    /// Re-reads the config file and applies it if it changed and is valid.
    /// Also refreshes the TLS certificate.
    pub async fn check(&mut self) {
        if let Some(certs) = self.certs.clone() {
            match tokio::task::spawn_blocking(move || certs.refresh()).await {
                Ok(Ok(true)) => tracing::info!("TLS certificate reloaded"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "TLS certificate not reloaded; the previous one stays")
                }
                Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
            }
        }
        let path = self.path.clone();
        let text = match tokio::task::spawn_blocking(move || std::fs::read_to_string(path)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return self.reject(format!("reading {}: {e}", self.path.display())),
            Err(e) => return self.reject(format!("reading config: {e}")),
        };
        let base = base_dir(&self.path);
        match self.reloader.consider(&text, &base) {
            Outcome::Unchanged => {}
            Outcome::Rejected(d) => {
                let rendered = d.render(&self.path);
                self.reject(rendered.trim_end().to_string());
            }
            Outcome::Apply(config) => {
                let config = *config;
                let for_dns = config.clone();
                let addrs =
                    match tokio::task::spawn_blocking(move || snapshot::resolve(&for_dns)).await {
                        Ok(Ok(a)) => a,
                        Ok(Err(e)) => return self.reject(e.to_string()),
                        Err(e) => return self.reject(e.to_string()),
                    };
                let previous = self.shared.snapshot.load_full();
                let generation = previous.generation + 1;
                let snap = Snapshot::build(
                    &config,
                    generation,
                    &addrs,
                    &self.shared.upstreams,
                    &self.shared.metrics,
                );
                snap.publish(Some(&previous), &self.shared.metrics);
                self.shared.snapshot.store(Arc::new(snap));
                self.reloader.applied(&text);
                let restart = restart_required(&self.started, &config);
                if !restart.is_empty() {
                    tracing::warn!(settings = ?restart, "changed settings take effect only after a restart");
                }
                self.shared
                    .metrics
                    .reloads
                    .with_label_values(&["success"])
                    .inc();
                {
                    let mut st = self.shared.reload_status();
                    st.last_result = "success";
                    st.last_error = None;
                    st.last_at = SystemTime::now();
                    st.restart_required = restart;
                }
                tracing::info!(
                    generation,
                    routes = config.routes.len(),
                    path = %self.path.display(),
                    "reload accepted"
                );
            }
        }
    }

    fn reject(&mut self, error: String) {
        tracing::error!(path = %self.path.display(), error = %error, "reload rejected; the running config stays");
        self.shared
            .metrics
            .reloads
            .with_label_values(&["failure"])
            .inc();
        let mut st = self.shared.reload_status();
        st.last_result = "failure";
        st.last_error = Some(error);
        st.last_at = SystemTime::now();
    }

    /// Watches the files until `shutdown` turns true.
    pub async fn watch(mut self, mut shutdown: watch::Receiver<bool>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if ev.is_ok() {
                let _ = tx.send(());
            }
        });
        let _watcher = match watcher {
            Ok(mut w) => {
                let mut dirs: Vec<PathBuf> = vec![base_dir(&self.path)];
                if let Some(c) = &self.certs {
                    dirs.extend(c.paths().iter().map(|p| base_dir(p)));
                }
                dirs.sort();
                dirs.dedup();
                for d in &dirs {
                    if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
                        tracing::warn!(dir = %d.display(), error = %e, "cannot watch; relying on SIGHUP and a 5 s poll");
                    }
                }
                Some(w)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no file watcher; relying on SIGHUP and a 5 s poll");
                None
            }
        };
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP");
                None
            }
        };
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(()) = rx.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                }
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    tracing::info!("SIGHUP: reloading");
                }
                _ = poll.tick() => {}
                _ = shutdown.changed() => return,
            }
            self.check().await;
        }
    }
}

/// The directory relative paths in a config file are resolved against.
pub fn base_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Settings that changed but are only read at start.
fn restart_required(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let (o, n) = (&old.proxy, &new.proxy);
    let mut diff = |changed: bool, name: &str| {
        if changed {
            out.push(name.to_string());
        }
    };
    diff(o.listen != n.listen, "proxy.listen");
    diff(o.workers != n.workers, "proxy.workers");
    diff(o.tls != n.tls, "proxy.tls");
    diff(
        o.max_connections != n.max_connections,
        "proxy.max_connections",
    );
    diff(
        o.max_header_bytes != n.max_header_bytes,
        "proxy.max_header_bytes",
    );
    diff(o.idle_timeout != n.idle_timeout, "proxy.idle_timeout");
    diff(o.shutdown_grace != n.shutdown_grace, "proxy.shutdown_grace");
    diff(old.admin != new.admin, "admin");
    diff(old.state != new.state, "state");
    out
}
