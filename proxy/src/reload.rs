//! Live reload: watch the config (and certificate) files, and hand a new,
//! valid config to the controller, which swaps the whole routing snapshot.
//!
//! The watch is on the files' directories, not the files: editors save by
//! rename and Kubernetes ConfigMaps swap a `..data` symlink, both of which a
//! watch on the file itself would miss. Events are debounced; SIGHUP and a
//! slow periodic check trigger the same path, which compares content, so a
//! spurious trigger costs one file read and changes nothing.
//!
//! A check runs beside the controller's loop (the judge never waits on
//! it), one at a time, each read bounded: a file system that stops
//! answering gets its check rejected, not the controller stopped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use veer_control::config::Config;
use veer_control::reload::{Outcome, Reloader};

use crate::shared::{Shared, Waiting};
use crate::snapshot;
use crate::sparse::{Repeats, REPEAT};
use crate::tls::{CertSet, Certs};

/// Quiet time after a file event before the reload runs.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Fallback check, for filesystems that do not report events.
const POLL: Duration = Duration::from_secs(5);

/// Applies new config files to a running proxy.
pub struct Reload {
    shared: Arc<Shared>,
    path: PathBuf,
    reloader: Reloader,
    /// The config at start: settings read only at start are compared with
    /// it. Its routes are not kept (they are not compared, and would
    /// outlive every reload).
    started: Config,
    certs: Option<Arc<Certs>>,
    /// `[fleet] cert_file`: its expiry is shown at each check.
    fleet_cert: Option<PathBuf>,
    /// Reads of the files under way (see [`MAX_READERS`]).
    readers: Waiting,
    /// Failures logged lately: the same one is logged again at most every
    /// minute (a broken file left in place is checked every 5 s).
    said: Arc<Repeats>,
}

impl Reload {
    /// A reloader for `path`, whose content `text` is running as `started`.
    pub fn new(
        shared: Arc<Shared>,
        path: PathBuf,
        text: &str,
        started: &Config,
        certs: Option<Arc<Certs>>,
    ) -> Reload {
        let mut reloader = Reloader::new();
        reloader.applied(text);
        Reload {
            shared,
            path,
            reloader,
            started: started.without_routes(),
            certs,
            fleet_cert: started
                .fleet
                .as_ref()
                .and_then(|f| f.client_cert.as_ref())
                .map(|(cert, _)| cert.clone()),
            readers: Waiting::default(),
            said: Arc::default(),
        }
    }

    /// Starts re-reading the config file (and the TLS certificate) in a
    /// task of its own, which the controller does not wait on: a file
    /// system that does not answer, or names that do not resolve, never
    /// hold up the judge. [`Reload::finish`] takes its result.
    pub fn start(&self) -> Checking {
        let certs = self.certs.clone();
        let (path, reloader, readers) = (self.path.clone(), self.reloader, self.readers.clone());
        let fleet_cert = self.fleet_cert.clone();
        let operators = self.started.admin.operators_file.clone();
        // (Only a configured one: the generated token lives in the state
        // dir, which may stop answering; its reads must not take the
        // readers the config's need.)
        let token = self.started.admin.token_file.clone();
        let (shared, said) = (self.shared.clone(), self.said.clone());
        Checking(tokio::spawn(async move {
            if let Some(certs) = &certs {
                refresh_certs(certs.clone(), &readers, &said).await;
            }
            if let Some(path) = operators {
                refresh_operators(path, &shared, &readers, &said).await;
            }
            if let Some(path) = token {
                refresh_token(path, &shared, &readers, &said).await;
            }
            if let Some(cert) = fleet_cert {
                show_fleet_cert(cert, &readers).await;
            }
            read(path, reloader, readers, certs).await
        }))
    }

    /// Takes a check's result: a new, valid config with its endpoints
    /// resolved; a rejected file is logged, counted and shown in `/status`
    /// here, and the running config stays.
    pub fn finish(&mut self, checked: Result<Checked, tokio::task::JoinError>) -> Option<Applied> {
        match checked {
            Ok(Checked::Unchanged) => {
                self.back_to_running();
                None
            }
            Ok(Checked::Apply(applied)) => Some(*applied),
            Ok(Checked::Rejected(error)) => {
                self.reject(error);
                None
            }
            Err(e) => {
                self.reject(format!("checking the config file: {e}"));
                None
            }
        }
    }

    /// Records that `applied` is now running as `generation`, and puts its
    /// TLS certificates in force if they changed.
    pub fn accepted(&mut self, applied: &Applied, generation: u64) {
        self.reloader.applied(&applied.text);
        self.said.clear(CONFIG);
        if let (Some(certs), Some(set)) = (&self.certs, &applied.certs) {
            certs.install(set.clone());
            tracing::info!(
                certificates = certs.status().certificates.len(),
                "TLS certificates and client verification of the new config in force"
            );
        }
        if let Some(tls) = self.certs.as_ref().and(applied.config.proxy.tls.as_ref()) {
            use std::sync::atomic::Ordering::Relaxed;
            let listening = self.shared.tls_listen_port.load(Relaxed);
            self.shared
                .https_port
                .store(tls.public_port.unwrap_or(listening), Relaxed);
        }
        if let Some(certs) = &self.certs {
            for (route, host) in certs.uncovered(&applied.config.routes) {
                tracing::warn!(route, host, "no [proxy.tls] certificate names this host: a TLS client asking for it gets the default certificate, and refuses it");
            }
            crate::tls::say_leaf_alone(certs);
        }
        if let Some(edge) = self.shared.edge.get() {
            edge.apply(&applied.config.proxy);
        }
        let reads = applied.config.admin.read_token;
        if self
            .shared
            .read_token
            .swap(reads, std::sync::atomic::Ordering::Relaxed)
            != reads
        {
            tracing::info!(
                read_token = reads,
                "admin reads (/status, /metrics) now {}",
                if reads { "need the token" } else { "are open" }
            );
        }
        let restart = restart_required(&self.started, &applied.config);
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
            st.last_at = crate::clock::wall_now();
            st.restart_required = restart;
        }
        log_warnings(&self.path, &applied.config);
        tracing::info!(
            generation,
            routes = applied.config.routes.len(),
            path = %self.path.display(),
            "reload accepted"
        );
    }

    /// The files veer re-reads when they change (their directories are
    /// watched).
    pub fn watched(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = vec![self.path.clone()];
        files.extend(self.started.admin.operators_file.iter().cloned());
        files.extend(self.started.admin.token_file.iter().cloned());
        if let Some(c) = &self.certs {
            files.extend(c.paths());
        }
        files.sort();
        files.dedup();
        files
    }

    /// Failures logged lately (see [`Repeats`]): the controller's
    /// re-resolutions say theirs through it too.
    pub fn said(&self) -> &Repeats {
        &self.said
    }

    /// The file is the running config again (a rejected edit undone): the
    /// rejection no longer stands, in `/status` or the log.
    fn back_to_running(&mut self) {
        let mut st = self.shared.reload_status();
        if st.last_result != "failure" {
            return;
        }
        st.last_result = "success";
        st.last_error = None;
        st.last_at = crate::clock::wall_now();
        self.said.clear(CONFIG);
        tracing::info!(path = %self.path.display(), "the config file is the running config again; the last rejection no longer stands");
    }

    fn reject(&mut self, error: String) {
        if self.said.fresh(CONFIG, &error, REPEAT) {
            tracing::error!(path = %self.path.display(), error = %error, "reload rejected; the running config stays");
        } else {
            tracing::debug!(path = %self.path.display(), error = %error, "reload rejected again; the running config stays");
        }
        self.shared
            .metrics
            .reloads
            .with_label_values(&["failure"])
            .inc();
        let mut st = self.shared.reload_status();
        st.last_result = "failure";
        st.last_error = Some(error);
        st.last_at = crate::clock::wall_now();
    }
}

/// The kind of a rejected config's lines (see [`Repeats`]).
const CONFIG: &str = "config";

/// A config check under way (see [`Reload::start`]).
pub struct Checking(tokio::task::JoinHandle<Checked>);

/// The result of the check under way, if any (never ready when there is
/// none).
pub async fn checked(checking: &mut Option<Checking>) -> Result<Checked, tokio::task::JoinError> {
    match checking {
        Some(Checking(task)) => task.await,
        None => std::future::pending().await,
    }
}

/// What a check of the config file found.
pub enum Checked {
    /// The same bytes as the running config.
    Unchanged,
    /// A new, valid config, resolved.
    Apply(Box<Applied>),
    /// Why the file is not applied; the running config stays.
    Rejected(String),
}

/// Longest wait for the config file's read and parse: a 1 000-route file
/// takes ~15 ms; a file system that takes this long does not answer.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads of the config file that may be left waiting on a file system
/// that does not answer; past this many, no new one starts (each holds a
/// thread) until one returns.
const MAX_READERS: usize = 4;

/// Why a read off the workers ([`off_workers`]) gave no answer.
#[derive(Debug)]
enum Unread {
    /// [`MAX_READERS`] earlier reads have not returned.
    Busy,
    /// The read's task ended without an answer (it panicked).
    Failed(tokio::task::JoinError),
    /// No answer within [`READ_TIMEOUT`].
    TimedOut,
}

impl std::fmt::Display for Unread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unread::Busy => write!(
                f,
                "{MAX_READERS} earlier reads of files have not returned (a file system that does not answer?); not starting another"
            ),
            Unread::Failed(e) => write!(f, "the read failed: {e}"),
            Unread::TimedOut => write!(
                f,
                "no answer within {READ_TIMEOUT:?} (a file system that does not answer?)"
            ),
        }
    }
}

/// Runs `read` (blocking file reads) on a blocking thread, counted among
/// [`MAX_READERS`] until it returns, and waits at most [`READ_TIMEOUT`]
/// for its answer (a read left waiting on a file system that does not
/// answer keeps its thread, and its place among the readers).
async fn off_workers<T: Send + 'static>(
    readers: &Waiting,
    read: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Unread> {
    let Some(reading) = readers.enter(MAX_READERS) else {
        return Err(Unread::Busy);
    };
    let task = tokio::task::spawn_blocking(move || {
        let r = read();
        drop(reading);
        r
    });
    match tokio::time::timeout(READ_TIMEOUT, task).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(Unread::Failed(e)),
        Err(_) => Err(Unread::TimedOut),
    }
}

/// Reads the TLS certificates and keys again if their files changed. A
/// failure that lasts is logged once a minute.
async fn refresh_certs(certs: Arc<Certs>, readers: &Waiting, said: &Repeats) {
    let read = {
        let certs = certs.clone();
        move || certs.refresh()
    };
    match off_workers(readers, read).await {
        Ok(r) => {
            if r.errors.is_empty() {
                said.clear("tls");
            }
            for e in &r.errors {
                if said.fresh("tls", &e.to_string(), REPEAT) {
                    tracing::warn!(error = %e, "TLS certificate not reloaded; the previous one stays");
                }
            }
            if r.swapped > 0 {
                tracing::info!(certificates = r.swapped, "TLS certificate reloaded");
                certs.show();
            }
            match &r.tickets {
                Ok(false) => said.clear("tls_tickets"),
                Ok(true) => {
                    said.clear("tls_tickets");
                    tracing::info!("TLS session ticket keys reloaded");
                }
                Err(e) => {
                    if said.fresh("tls_tickets", &e.to_string(), REPEAT) {
                        tracing::warn!(error = %e, "TLS session ticket keys not reloaded; the keys before stay");
                    }
                }
            }
        }
        Err(e) => {
            if said.fresh("tls", &e.to_string(), REPEAT) {
                tracing::warn!(error = %e, "TLS certificate files not read; the previous certificate stays")
            }
        }
    }
}

/// Reads `[admin] operators_file` again: a changed, valid file's tokens
/// are the ones taken from the next request on (an operator removed can
/// act no more); one that does not load keeps those before (logged).
async fn refresh_operators(path: PathBuf, shared: &Shared, readers: &Waiting, said: &Repeats) {
    match off_workers(readers, move || crate::token::Operators::read(&path)).await {
        Ok(Ok(o)) => {
            said.clear("operators");
            if o.digest() != shared.operators.load().digest() {
                tracing::info!(operators = o.len(), "operators' tokens reloaded");
                shared.operators.store(Arc::new(o));
            }
        }
        Ok(Err(e)) => {
            if said.fresh("operators", &e.to_string(), REPEAT) {
                tracing::warn!(error = %e, "operators' tokens not reloaded; the previous ones stay")
            }
        }
        Err(e) => {
            if said.fresh("operators", &e.to_string(), REPEAT) {
                tracing::warn!(error = %e, "operators' tokens not read; the previous ones stay")
            }
        }
    }
}

/// Reads `[admin] token_file` again: a changed token is the one taken from the
/// next request on (the one before is refused: a rotated secret); a file
/// that no longer gives one (missing, empty, readable by others) keeps
/// the token before (logged).
async fn refresh_token(path: PathBuf, shared: &Shared, readers: &Waiting, said: &Repeats) {
    let shown = path.display().to_string();
    match off_workers(readers, move || crate::token::read(&path)).await {
        Ok(Ok(t)) => {
            said.clear("token");
            if shared.admin_token.load().as_deref().map(String::as_str) != Some(&*t) {
                tracing::info!(path = %shown, "admin token reloaded: actions need the new one");
                shared.admin_token.store(Some(Arc::new(t.to_string())));
            }
        }
        Ok(Err(e)) => {
            if said.fresh("token", &e.to_string(), REPEAT) {
                tracing::warn!(error = %e, "admin token not reloaded; the previous one stays")
            }
        }
        Err(e) => {
            if said.fresh("token", &e.to_string(), REPEAT) {
                tracing::warn!(path = %shown, error = %e, "admin token not read; the previous one stays")
            }
        }
    }
}

/// Shows the expiry of the fleet's etcd client certificate, read again:
/// the agent reads the file at each connection to etcd, so its content
/// is what the next connection presents.
async fn show_fleet_cert(cert: PathBuf, readers: &Waiting) {
    if let Err(e) = off_workers(readers, move || crate::tls::show_expiry_file(&cert)).await {
        tracing::debug!(error = %e, "the fleet's client certificate not read");
    }
}

/// Reads, parses and resolves the config file at `path`, and loads the
/// TLS certificates it names if they are not those in force (`certs`).
async fn read(
    path: PathBuf,
    reloader: Reloader,
    readers: Waiting,
    certs: Option<Arc<Certs>>,
) -> Checked {
    // Read and parsed off the workers (a 1 000-route file takes ~15 ms
    // to parse, which a worker would not spend serving requests), on a
    // thread that ends with the parse, not a pooled blocking thread that
    // lives on: the parse's passing allocations (~10 MB for 1 000 routes)
    // stay with its thread's heap, and a thread's end is when mimalloc
    // hands its emptied pages back and returns to the system those
    // emptied more than a second before (an idle veer frees no pages that
    // would make it look sooner). Measured in benches/RESULTS.md,
    // "Session 39".
    let Some(reading) = readers.enter(MAX_READERS) else {
        return Checked::Rejected(format!("reading {}: {}", path.display(), Unread::Busy));
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let file = path.clone();
    let spawned = std::thread::Builder::new()
        .name("veer-reload".into())
        .spawn(move || {
            let read = std::fs::read_to_string(&file).map(|text| {
                let outcome = reloader.consider(&text, &base_dir(&file));
                (text, outcome)
            });
            drop(reading);
            let _ = tx.send(read);
        });
    if let Err(e) = spawned {
        return Checked::Rejected(format!("reading config: no thread to parse it on: {e}"));
    }
    let (text, outcome) = match tokio::time::timeout(READ_TIMEOUT, rx).await {
        Ok(Ok(Ok(t))) => t,
        Ok(Ok(Err(e))) => return Checked::Rejected(format!("reading {}: {e}", path.display())),
        Ok(Err(_)) => {
            return Checked::Rejected("reading config: the parse ended without an answer".into())
        }
        Err(_) => {
            let path = path.display();
            return Checked::Rejected(format!("reading {path}: {}", Unread::TimedOut));
        }
    };
    match outcome {
        Outcome::Unchanged => Checked::Unchanged,
        Outcome::Rejected(d) => Checked::Rejected(d.render(&path).trim_end().to_string()),
        Outcome::Apply(config) => {
            let config = *config;
            let for_dns = config.clone();
            // Bounded: a file whose names do not resolve in time is
            // rejected like one that does not resolve at all.
            let lookup = tokio::task::spawn_blocking(move || snapshot::resolve(&for_dns));
            let addrs = match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                Ok(Ok(Ok(addrs))) => addrs,
                Ok(Ok(Err(e))) => return Checked::Rejected(e.to_string()),
                Ok(Err(e)) => return Checked::Rejected(e.to_string()),
                Err(_) => {
                    return Checked::Rejected(format!(
                        "endpoint host names did not resolve within {RESOLVE_TIMEOUT:?}"
                    ))
                }
            };
            let certs = match (certs, &config.proxy.tls) {
                // ([proxy.tls] added or removed: a restart, said by
                // `restart_required`.)
                (Some(certs), Some(tls)) => match prepare_certs(certs, tls, &readers).await {
                    Ok(set) => set,
                    Err(e) => return Checked::Rejected(format!("[proxy.tls]: {e}")),
                },
                _ => None,
            };
            Checked::Apply(Box::new(Applied {
                config,
                addrs,
                text,
                certs,
            }))
        }
    }
}

/// Loads the certificates `tls` names if they are not those in force.
async fn prepare_certs(
    certs: Arc<Certs>,
    tls: &veer_control::config::TlsSettings,
    readers: &Waiting,
) -> Result<Option<Arc<CertSet>>, String> {
    let tls = tls.clone();
    match off_workers(readers, move || certs.prepare(&tls)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("certificate files not read: {e}")),
    }
}

/// Longest wait for a new config's endpoint names to resolve.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A new config, validated and resolved, not yet applied.
pub struct Applied {
    /// The config.
    pub config: Config,
    /// Resolved endpoint addresses.
    pub addrs: crate::snapshot::Addresses,
    /// The file's text.
    pub text: String,
    /// The TLS certificates it names, loaded, when not those in force.
    pub certs: Option<Arc<CertSet>>,
}

/// What makes veer look at its files again: a change to one of them
/// (seen in a watched directory, debounced), SIGHUP, or the slow periodic
/// check.
pub struct Triggers {
    /// An event in a watched directory that concerns a file re-read.
    rx: mpsc::UnboundedReceiver<()>,
    hup: Option<tokio::signal::unix::Signal>,
    poll: tokio::time::Interval,
    pending: Option<tokio::time::Instant>,
    watcher: Option<notify::RecommendedWatcher>,
    /// The directories watched.
    dirs: std::collections::HashSet<PathBuf>,
    /// The files re-read (see [`concerns`]), shared with the watcher's
    /// thread, which filters its events.
    files: Arc<std::sync::Mutex<Vec<PathBuf>>>,
}

impl Triggers {
    /// Watches the directories of `files` (non-recursively).
    pub fn new(files: &[PathBuf]) -> Triggers {
        let (tx, rx) = mpsc::unbounded_channel();
        let watched: Arc<std::sync::Mutex<Vec<PathBuf>>> = Arc::default();
        let of_interest = watched.clone();
        // (On notify's thread: a symlink read there holds up no task, and
        // is made on a copy of the list, so that `watch` never waits on it.)
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(e) = ev {
                let files = of_interest
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                if changes(&e.kind) && concerns(&files, &e.paths) {
                    let _ = tx.send(());
                }
            }
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "no file watcher; relying on SIGHUP and a 5 s poll");
                None
            }
        };
        let hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP");
                None
            }
        };
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.reset();
        let mut triggers = Triggers {
            rx,
            hup,
            poll,
            pending: None,
            watcher,
            dirs: Default::default(),
            files: watched,
        };
        triggers.watch(files);
        triggers
    }

    /// Watches the directories of those of `files` not watched yet (a
    /// reload naming certificates elsewhere). A file no longer named stays
    /// watched: a spurious trigger costs a read.
    pub fn watch(&mut self, files: &[PathBuf]) {
        {
            let mut known = self.files.lock().unwrap_or_else(|p| p.into_inner());
            for f in files {
                if !known.contains(f) {
                    known.push(f.clone());
                }
            }
        }
        let Some(w) = &mut self.watcher else { return };
        for d in files.iter().map(|f| base_dir(f)) {
            if !self.dirs.insert(d.clone()) {
                continue;
            }
            if let Err(e) = w.watch(&d, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %d.display(), error = %e, "cannot watch; relying on SIGHUP and a 5 s poll");
            }
        }
    }

    /// Waits for the next reason to re-read the files. Cancel-safe: the
    /// controller polls it in a `select!` with other work, so a pending
    /// debounce survives being dropped half-way.
    pub async fn next(&mut self) {
        loop {
            if let Some(deadline) = self.pending {
                tokio::time::sleep_until(deadline).await;
                while self.rx.try_recv().is_ok() {}
                self.pending = None;
                return;
            }
            let hup = &mut self.hup;
            tokio::select! {
                Some(()) = self.rx.recv() => {
                    self.pending = Some(tokio::time::Instant::now() + DEBOUNCE);
                }
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    tracing::info!("SIGHUP: reloading");
                    return;
                }
                _ = self.poll.tick() => return,
            }
        }
    }
}

/// Whether an event naming `paths` in a watched directory may have
/// changed one of `files`: it names one of them (or the file a symlink
/// among them points to), or a name Kubernetes' atomic writer uses
/// (`..data`, the `..2026_12_07...` directory it points to: a mounted
/// ConfigMap or Secret swaps them, not the files), or nothing at all. Any
/// other file in the directory is no reason: a log written beside the
/// config (`veer run 2> veer.log`) would otherwise trigger a check with
/// every line, and a rejected config's error line the next check, ten
/// times a second.
fn concerns(files: &[PathBuf], paths: &[PathBuf]) -> bool {
    let named = |name: &std::ffi::OsStr| {
        name.as_encoded_bytes().starts_with(b"..")
            || files.iter().any(|f| {
                f.file_name() == Some(name)
                    || std::fs::read_link(f).is_ok_and(|t| t.file_name() == Some(name))
            })
    };
    paths.is_empty() || paths.iter().any(|p| p.file_name().is_some_and(named))
}

/// Whether a watched directory's event may have changed a file: anything
/// but an access. notify (8) reports opening and closing a file read-only
/// too, and veer's own read of its files at each check is such an access:
/// counted as a change, it made every check trigger the next, ten times a
/// second (the debounce) from the first periodic check on.
fn changes(kind: &notify::EventKind) -> bool {
    !matches!(kind, notify::EventKind::Access(_))
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
    // (The certificates and client verification apply live.)
    diff(
        o.tls.as_ref().map(|t| &t.listen) != n.tls.as_ref().map(|t| &t.listen),
        "proxy.tls.listen",
    );
    // (The connections' limits apply to new connections: `Edge::apply`.)
    diff(o.proxy_protocol != n.proxy_protocol, "proxy.proxy_protocol");
    // (`public_url` only shapes webhook messages: it applies live.)
    let (oa, na) = (&old.admin, &new.admin);
    diff(
        oa.listen != na.listen
            || oa.token_file != na.token_file
            || oa.operators_file != na.operators_file,
        "admin",
    );
    diff(old.state != new.state, "state");
    diff(old.fleet != new.fleet, "fleet");
    out
}

/// Logs the config's warnings (valid settings that are often mistakes).
pub fn log_warnings(path: &std::path::Path, config: &veer_control::config::Config) {
    for w in &config.warnings {
        tracing::warn!(path = %path.display(), line = w.line, col = w.col, "config warning: {}", w.message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With as many reads waiting as allowed, a check is rejected without
    /// starting another (no thread left on a file system that does not
    /// answer); once one returns, a check reads again.
    #[tokio::test]
    async fn no_read_starts_while_the_most_allowed_wait() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("veer.toml");
        std::fs::write(&file, "[[route]]").unwrap();
        let readers = Waiting::default();
        let mut stuck: Vec<_> = (0..MAX_READERS)
            .filter_map(|_| readers.enter(MAX_READERS))
            .collect();
        match read(file.clone(), Reloader::new(), readers.clone(), None).await {
            Checked::Rejected(e) => assert!(e.contains("have not returned"), "{e}"),
            _ => panic!("a read started past the bound"),
        }
        assert_eq!(readers.count(), MAX_READERS);
        stuck.pop();
        match read(file, Reloader::new(), readers.clone(), None).await {
            // Read and parsed: an invalid file's diagnostics.
            Checked::Rejected(e) => assert!(e.contains("veer.toml:"), "{e}"),
            _ => panic!("an invalid file applied"),
        }
        assert_eq!(readers.count(), MAX_READERS - 1);
    }

    /// Whether the watcher passed an event on within `within` (the
    /// periodic check does not come through here: a test of the filter
    /// cannot pass by it).
    async fn event_within(t: &mut Triggers, within: Duration) -> bool {
        tokio::time::timeout(within, t.rx.recv()).await.is_ok()
    }

    /// No event passed on within 600 ms (a negative check: a slow machine
    /// can only make it miss a bug, never fail on a correct filter).
    async fn no_event(t: &mut Triggers) -> bool {
        tokio::time::sleep(Duration::from_millis(600)).await;
        t.rx.try_recv().is_err()
    }

    /// Reading a watched file (as every check does) triggers nothing;
    /// writing it does.
    #[tokio::test]
    async fn reading_a_watched_file_is_no_trigger_and_writing_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("veer.toml");
        std::fs::write(&file, "a").unwrap();
        let mut triggers = Triggers::new(std::slice::from_ref(&file));
        for _ in 0..5 {
            assert_eq!(std::fs::read_to_string(&file).unwrap(), "a");
        }
        assert!(
            no_event(&mut triggers).await,
            "a read of a watched file triggered a check"
        );
        std::fs::write(&file, "b").unwrap();
        assert!(
            event_within(&mut triggers, Duration::from_secs(30)).await,
            "a write to a watched file did not trigger a check"
        );
    }

    /// A directory a reload names (certificates kept elsewhere) is watched
    /// from then on: a write there is an event, not only the 5 s poll's.
    #[tokio::test]
    async fn a_directory_watched_later_reports_its_writes() {
        let first = tempfile::tempdir().unwrap();
        let later = tempfile::tempdir().unwrap();
        let config = first.path().join("veer.toml");
        let mut triggers = Triggers::new(std::slice::from_ref(&config));
        triggers.watch(&[config, later.path().join("tls.crt")]);
        assert_eq!(triggers.dirs.len(), 2);
        std::fs::write(later.path().join("tls.crt"), "renewed").unwrap();
        assert!(
            event_within(&mut triggers, Duration::from_secs(30)).await,
            "no event from the directory watched later"
        );
    }

    /// Another file written beside the config (its log, an editor's swap
    /// file) triggers nothing; the config replaced by a rename, and a
    /// Kubernetes volume's `..data` link swapped, do.
    #[tokio::test]
    async fn only_a_change_to_a_file_read_again_triggers_a_check() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("veer.toml");
        std::fs::write(&file, "a").unwrap();
        let mut triggers = Triggers::new(std::slice::from_ref(&file));
        let log = dir.path().join("veer.log");
        for i in 0..20 {
            std::fs::write(&log, format!("line {i}")).unwrap();
        }
        std::fs::write(dir.path().join(".veer.toml.swp"), "x").unwrap();
        assert!(
            no_event(&mut triggers).await,
            "a write to another file triggered a check"
        );
        // (`sed -i`, most editors: a new file renamed over the config.)
        let tmp = dir.path().join("sedAbc123");
        std::fs::write(&tmp, "b").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        assert!(
            event_within(&mut triggers, Duration::from_secs(30)).await,
            "the config renamed into place triggered nothing"
        );
        // (The rename may bring more than one event: those are let go, so
        // that the next check hears only the swap's.)
        tokio::time::sleep(Duration::from_millis(300)).await;
        while triggers.rx.try_recv().is_ok() {}
        // A ConfigMap's update: `..data` points to a new directory.
        std::os::unix::fs::symlink("..2026_12_07_01", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        assert!(
            event_within(&mut triggers, Duration::from_secs(30)).await,
            "a swapped ..data link triggered nothing"
        );
    }

    /// A config that is a symlink to a file beside it under another name
    /// (`veer.toml -> blue.toml`): a change to that file triggers a check.
    #[tokio::test]
    async fn a_change_to_the_file_a_symlinked_config_points_to_triggers_a_check() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("blue.toml"), "a").unwrap();
        let file = dir.path().join("veer.toml");
        std::os::unix::fs::symlink("blue.toml", &file).unwrap();
        let mut triggers = Triggers::new(std::slice::from_ref(&file));
        std::fs::write(dir.path().join("green.toml"), "b").unwrap();
        assert!(
            no_event(&mut triggers).await,
            "a file the config does not point to triggered a check"
        );
        std::fs::write(dir.path().join("blue.toml"), "c").unwrap();
        assert!(
            event_within(&mut triggers, Duration::from_secs(30)).await,
            "the file the config points to triggered nothing"
        );
    }
}
