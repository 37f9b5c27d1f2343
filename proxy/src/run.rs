//! `veer run`: load the config, bind, serve, reload, and shut down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use veer_control::config::{Config, Diagnostics};
use veer_control::state::StateError;

use crate::admin::Admin;
use crate::controller::Controller;
use crate::metrics::Metrics;
use crate::reload::{base_dir, Applied};
use crate::server::{bind_all, serve, Edge};
use crate::snapshot::{self, BuildError};
use crate::tls::{Certs, TlsError};
use crate::upstream::Upstreams;

/// How long shutdown waits for the controller to write its state down.
const STATE_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// Why veer could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The config file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is invalid.
    #[error("{}", .diagnostics.render(.path).trim_end())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem.
        diagnostics: Diagnostics,
    },
    /// Endpoints did not resolve.
    #[error("{0}")]
    Build(#[from] BuildError),
    /// The TLS certificate or key could not be loaded.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The TLS configuration was refused.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// An address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A blocking task failed.
    #[error("internal: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// Persisted decisions could not be read; starting without them could
    /// re-expose a reverted canary.
    #[error("state: {0} (fix or remove the file; veer will not guess past decisions)")]
    State(#[from] StateError),
    /// The admin token could not be read or made.
    #[error("{0}")]
    Token(#[from] crate::token::TokenError),
    /// Another process holds `[state] dir`.
    #[error("{0}")]
    StateDirInUse(#[from] crate::persist::DirInUse),
}

/// A config file read and validated.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The file.
    pub path: PathBuf,
    /// Its text.
    pub text: String,
    /// Its meaning.
    pub config: Config,
}

/// How long a start-up step (a file read, a DNS lookup) may go before the
/// log says what start-up waits for; said again each time as long.
const STILL_WAITING: std::time::Duration = std::time::Duration::from_secs(5);

/// Logs that start-up has waited `waited` for `what`.
fn still_waiting(what: &str, waited: std::time::Duration) {
    tracing::warn!(
        waiting_for = what,
        waited = ?waited,
        "start-up is still waiting (a file system or DNS that does not answer?)"
    );
}

/// Awaits a start-up step, saying in the log every 5 s that start-up
/// still waits for `what`: a file system or resolver that does not
/// answer would otherwise hold the start with no listener and no word.
pub async fn start_step<T>(what: &str, step: impl Future<Output = T>) -> T {
    tokio::pin!(step);
    let mut waited = std::time::Duration::ZERO;
    loop {
        match tokio::time::timeout(STILL_WAITING, &mut step).await {
            Ok(v) => return v,
            Err(_) => {
                waited += STILL_WAITING;
                still_waiting(what, waited);
            }
        }
    }
}

/// [`load`] at start-up, on a thread of its own, saying in the log every
/// 5 s that start-up still waits for the file (the runtime, whose size
/// the file gives, does not exist yet).
pub fn load_at_start(path: &Path) -> Result<Loaded, RunError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let file = path.to_path_buf();
    let reader = std::thread::Builder::new()
        .name("veer-load".into())
        .spawn(move || {
            let _ = tx.send(load(&file));
        });
    if let Err(source) = reader {
        return Err(RunError::Read {
            path: path.to_path_buf(),
            source,
        });
    }
    let what = path.display().to_string();
    let mut waited = std::time::Duration::ZERO;
    loop {
        match rx.recv_timeout(STILL_WAITING) {
            Ok(loaded) => return loaded,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                waited += STILL_WAITING;
                still_waiting(&what, waited);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(RunError::Read {
                    path: path.to_path_buf(),
                    source: std::io::Error::other("the reading thread ended without a result"),
                })
            }
        }
    }
}

/// Reads and validates a config file. Blocking.
pub fn load(path: &Path) -> Result<Loaded, RunError> {
    let text = std::fs::read_to_string(path).map_err(|source| RunError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let config =
        Config::parse(&text, &base_dir(path)).map_err(|diagnostics| RunError::Invalid {
            path: path.to_path_buf(),
            diagnostics,
        })?;
    Ok(Loaded {
        path: path.to_path_buf(),
        text,
        config,
    })
}

/// The addresses veer ended up listening on (useful with port 0).
#[derive(Clone, Debug)]
pub struct Bound {
    /// Plain listeners.
    pub proxy: Vec<SocketAddr>,
    /// TLS listeners.
    pub tls: Vec<SocketAddr>,
    /// The admin listener.
    pub admin: SocketAddr,
}

/// The next SIGTERM or SIGINT from now on: its name (never, if they
/// cannot be listened to: logged).
pub async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        }
        _ => {
            tracing::error!("cannot listen for SIGTERM/SIGINT; stop with SIGKILL");
            std::future::pending().await
        }
    }
}

/// Runs the proxy until `stop` completes, then shuts down gracefully (a
/// second SIGTERM or SIGINT meanwhile cuts the wait for in-flight requests
/// short).
/// `on_ready` receives the bound addresses once traffic is being served.
pub async fn run(
    loaded: Loaded,
    stop: impl Future<Output = ()>,
    on_ready: Option<oneshot::Sender<Bound>>,
) -> Result<(), RunError> {
    let Loaded { path, text, config } = loaded;
    let metrics = Arc::new(Metrics::new()?);
    let upstreams = Upstreams::new();
    let for_dns = config.clone();
    let resolve = tokio::task::spawn_blocking(move || snapshot::resolve(&for_dns));
    let addrs = start_step("resolving the endpoints' host names", resolve).await??;
    // First of all that writes there: one process a state dir (see
    // `persist::lock_dir`); held until this returns, after the last write.
    let state_dir = config.state.dir.clone();
    let lock = tokio::task::spawn_blocking(move || crate::persist::lock_dir(&state_dir));
    let _state_lock = start_step("the state dir's lock", lock).await??;
    let (token_file, state_dir) = (config.admin.token_file.clone(), config.state.dir.clone());
    let token =
        tokio::task::spawn_blocking(move || crate::token::load(token_file.as_deref(), &state_dir));
    let (token, source) = start_step("the admin token", token).await??;
    match &source {
        crate::token::Source::Generated(p) => {
            tracing::info!(path = %p.display(), "admin token generated: actions need it as a bearer token")
        }
        crate::token::Source::Kept(p) | crate::token::Source::Configured(p) => {
            tracing::info!(path = %p.display(), "admin token read")
        }
    }
    if let Some((cert, _)) = config.fleet.as_ref().and_then(|f| f.client_cert.clone()) {
        let show = tokio::task::spawn_blocking(move || crate::tls::show_expiry_file(&cert));
        start_step("the fleet's client certificate", show).await?;
    }
    let certs = match &config.proxy.tls {
        Some(t) => {
            let t = t.clone();
            let open = tokio::task::spawn_blocking(move || Certs::open(&t));
            let certs = start_step("the TLS certificates", open).await??;
            for (route, host) in certs.uncovered(&config.routes) {
                tracing::warn!(route, host, "no [proxy.tls] certificate names this host: a TLS client asking for it gets the default certificate, and refuses it");
            }
            crate::tls::say_leaf_alone(&certs);
            Some(Arc::new(certs))
        }
        None => None,
    };
    // What this function keeps of the config are the settings read at
    // start; the routes go to the controller (and would outlive every
    // reload here).
    let routes = config.routes.len();
    let settings = config.without_routes();
    let applied = Applied {
        config,
        addrs,
        text,
        certs: None,
    };
    let config = settings;
    let operators = match config.admin.operators_file.clone() {
        Some(path) => {
            let read = tokio::task::spawn_blocking(move || crate::token::Operators::read(&path));
            let operators = start_step("the operators' tokens", read).await??;
            tracing::info!(operators = operators.len(), "operators' tokens read");
            Some(operators)
        }
        None => None,
    };
    let (controller, shared) =
        Controller::start(applied, path.clone(), certs.clone(), metrics, upstreams).await?;
    shared.metrics.reloads.with_label_values(&["success"]).inc();
    if let Some(o) = operators {
        shared.operators.store(Arc::new(o));
    }
    shared.admin_token.store(Some(Arc::new(token.to_string())));
    if let Some(c) = &certs {
        c.show();
    }
    let plain =
        bind_all(&config.proxy.listen).map_err(|(addr, source)| RunError::Bind { addr, source })?;
    let secure = match &config.proxy.tls {
        Some(t) => bind_all(&t.listen).map_err(|(addr, source)| RunError::Bind { addr, source })?,
        None => Vec::new(),
    };
    let admin = bind_all(&[config.admin.listen])
        .map_err(|(addr, source)| RunError::Bind { addr, source })?
        .pop();
    let bound = Bound {
        proxy: plain.iter().filter_map(|l| l.local_addr().ok()).collect(),
        tls: secure.iter().filter_map(|l| l.local_addr().ok()).collect(),
        admin: admin
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .unwrap_or(config.admin.listen),
    };

    if let Some(a) = bound.tls.first() {
        shared.tls_listen_port.store(a.port(), Ordering::Relaxed);
        let public = config.proxy.tls.as_ref().and_then(|t| t.public_port);
        shared
            .https_port
            .store(public.unwrap_or(a.port()), Ordering::Relaxed);
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let edge = Arc::new(Edge::new(&config.proxy));
    let _ = shared.edge.set(edge.clone());
    let mut tasks = Vec::new();
    let (actions_tx, actions_rx) = mpsc::channel(16);
    if let Some(admin) = admin {
        let handle = Admin {
            actions: actions_tx,
            renders: Arc::new(Semaphore::new(1)),
        };
        tasks.push(tokio::spawn(crate::admin::serve(
            admin,
            shared.clone(),
            handle,
            shutdown_rx.clone(),
        )));
    }
    let mut listeners: Vec<_> = plain.into_iter().map(|l| (l, None)).collect();
    if let Some(certs) = &certs {
        listeners.extend(secure.into_iter().map(|l| (l, Some(certs.clone()))));
    }
    let mut accepting = tokio::spawn(serve(
        listeners,
        shared.clone(),
        edge.clone(),
        shutdown_rx.clone(),
    ));
    let controller = tokio::spawn(controller.run(actions_rx, shutdown_rx.clone()));

    for a in &bound.proxy {
        tracing::info!(kind = "proxy", addr = %a, "listening");
    }
    for a in &bound.tls {
        tracing::info!(kind = "tls", addr = %a, "listening");
    }
    tracing::info!(kind = "admin", addr = %bound.admin, "listening");
    shared.ready.store(true, Ordering::Release);
    crate::reload::log_warnings(&path, &config);
    tracing::info!(
        config = %path.display(),
        routes,
        "veer ready"
    );
    if let Some(tx) = on_ready {
        let _ = tx.send(bound);
    }

    stop.await;
    shared.ready.store(false, Ordering::Release);
    // (As a reload last set them.)
    let grace = edge.now().shutdown_grace;
    tracing::info!(grace = ?grace, "shutting down: no new connections; finishing in-flight requests");
    let _ = shutdown_tx.send(true);
    // Every slot there is free: no connection open. (Counted once the
    // accept loop has returned: it alone changes the count.)
    let all = async {
        let _ = (&mut accepting).await;
        let all = u32::try_from(edge.slots()).unwrap_or(u32::MAX);
        edge.permits().acquire_many(all).await.map(drop)
    };
    tokio::select! {
        drained = tokio::time::timeout(grace, all) => match drained {
            Ok(_) => tracing::info!("all connections closed"),
            Err(_) => {
                shared.grace_over.store(true, Ordering::Release);
                tracing::warn!(
                    open = shared.metrics.open_connections.get(),
                    "grace period over; closing the remaining connections"
                )
            }
        },
        // A second SIGTERM or SIGINT (Ctrl-C again) cuts the grace short;
        // the state is still written below.
        _ = stop_signal() => {
            shared.grace_over.store(true, Ordering::Release);
            tracing::warn!(
                open = shared.metrics.open_connections.get(),
                "stop signalled again: closing the remaining connections now"
            )
        }
    }
    accepting.abort();
    for t in tasks {
        t.abort();
    }
    // The controller writes the judges' evidence down before it returns.
    if tokio::time::timeout(STATE_FLUSH, controller).await.is_err() {
        tracing::warn!(limit = ?STATE_FLUSH, "state not written in time at shutdown; the evidence of the last seconds is lost");
    }
    Ok(())
}
