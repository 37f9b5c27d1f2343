//! The `veer` binary: command line, logging, runtime, signals.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use veer_proxy::{check, demo, run, status};

/// Every request allocates a little (header maps, body frames); mimalloc's
/// per-thread free lists make that cheaper than glibc's malloc. Built with
/// `no_thp`: mimalloc otherwise asks for transparent huge pages on its
/// arenas, and every 2 MiB page it touches is then resident whole (a
/// one-route proxy sat at 26 MiB under load instead of 15). On a host with
/// THP set to `always`, `MIMALLOC_ALLOW_THP=0` turns them off for veer.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "veer", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("VEER_BUILD"), ")"), about = "A canary proxy that reverts bad versions by itself")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Config file.
        #[arg(long, env = "VEER_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file without starting anything.
    Check {
        /// Config file.
        #[arg(long, env = "VEER_CONFIG")]
        config: PathBuf,
    },
    /// A self-contained demonstration on loopback.
    Demo {
        /// How long the demo runs.
        #[arg(long, default_value = "30s", value_parser = humantime_duration)]
        duration: Duration,
        /// Only serve the demo's stable and canary upstreams (for config.example.toml).
        #[arg(long)]
        upstreams_only: bool,
    },
    /// Exit 0 if a running proxy answers `/healthz` (for container health checks).
    Health {
        /// The admin address.
        #[arg(long, env = "VEER_ADMIN", default_value = "127.0.0.1:9901")]
        admin: String,
    },
    /// Print a running proxy's routes, weights, verdicts and window statistics.
    Status {
        /// The admin address (default: the config's, else 127.0.0.1:9901).
        #[arg(long)]
        admin: Option<String>,
        /// The admin token's file, for a proxy with `[admin] read_token`
        /// (its `token_file`, or `[state] dir`/admin.token).
        #[arg(long, env = "VEER_ADMIN_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// The proxy's config file: its admin address and token file.
        #[arg(long, env = "VEER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Take a route's canary out of traffic now (kept across restarts
    /// until `reset`).
    Revert(ActionArgs),
    /// Forget a route's revert or promotion and start its canary's tests
    /// and rollout again.
    Reset(ActionArgs),
    /// Keep judging a route and reporting, but neither act nor step its
    /// rollout.
    Pause(ActionArgs),
    /// Undo `pause`.
    Resume(ActionArgs),
    /// Send all of a route's traffic to its canary.
    Promote(ActionArgs),
    /// Write a veer config from another tool's configuration (stdout);
    /// what cannot be expressed is listed on stderr and as comments.
    #[command(subcommand)]
    Import(Import),
}

/// An operator's action on a running proxy, through its admin endpoint.
#[derive(clap::Args)]
struct ActionArgs {
    /// The route.
    route: String,
    /// The admin address (default: the config's, else 127.0.0.1:9901).
    #[arg(long, env = "VEER_ADMIN")]
    admin: Option<String>,
    /// The admin token's file (`[admin] token_file`, or `[state]
    /// dir`/admin.token; default: the config's).
    #[arg(long, env = "VEER_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The proxy's config file: its admin address and token file.
    #[arg(long, env = "VEER_CONFIG")]
    config: Option<PathBuf>,
    /// Why, for the record: a revert's reason, the log's audit line.
    #[arg(long)]
    reason: Option<String>,
    /// Who asks (default: $USER@HOSTNAME).
    #[arg(long)]
    by: Option<String>,
}

/// What `veer import` reads.
#[derive(Subcommand)]
enum Import {
    /// Kubernetes Ingress manifests with ingress-nginx canary annotations
    /// (YAML, several documents per file; `-` reads stdin).
    IngressNginx {
        /// Where the Ingresses' TLS Secrets are mounted, each in
        /// DIR/NAMESPACE/NAME/ (tls.crt, tls.key): written as [proxy.tls]
        /// certificates (the first also the default). Without it, each is
        /// a note.
        #[arg(long, value_name = "DIR")]
        tls_dir: Option<PathBuf>,
        /// Manifest files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// A duration with a unit ("45s", "2m"), or a bare number of seconds.
fn humantime_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.trim().parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Log lines waiting for the log thread, at most. The queue's slots are
/// allocated and touched at start (32 bytes each, whether a line ever
/// waits): tracing-appender's default of 128 000 cost 4 MiB of every
/// process's memory; 16 384 cost 0.5 MiB and still hold a second of lines
/// at 16 000 a second while stderr's reader stalls.
const LOG_QUEUE_LINES: usize = 16_384;

/// Log lines are written to stderr by a thread of their own: a worker
/// never waits on a slow reader of stderr (a container runtime's log pipe,
/// with an access log line per request). Lines that find the queue full
/// ([`LOG_QUEUE_LINES`] waiting) are dropped rather than stalling
/// requests, and counted. The guard writes what is queued when it is
/// dropped, at exit.
///
/// Access log lines are made by [`veer_proxy::access`] in the same shape
/// as tracing's and written in batches by a thread of their own, except on
/// a terminal, where tracing colours them.
fn init_logs(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("veer-log")
        .finish(std::io::stderr());
    veer_proxy::log_drops::count(writer.error_counter());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match format {
        LogFormat::Json => veer_proxy::access::install(true),
        LogFormat::Text if !ansi => veer_proxy::access::install(false),
        LogFormat::Text => {}
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}

/// The runtime: one worker thread per core by default. With exactly one
/// worker, a current-thread runtime does the same job without work-stealing
/// and cross-thread wake-ups.
fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if workers > 1 {
        b.worker_threads(workers);
    }
    if workers > 0 {
        // One recording shard per worker (the default is one per core, as
        // for the runtime's workers).
        veer_proxy::record::set_shards(workers);
    }
    b.enable_all()
        .thread_name("veer-worker")
        .build()
        .context("starting the runtime")
}

async fn terminated() {
    let signal = run::stop_signal().await;
    tracing::info!("{signal} received");
}

/// mimalloc's setting for how long an emptied page stays resident, and
/// the value a long-running veer gives it unless its environment names one.
const PURGE_DELAY: &str = "MIMALLOC_PURGE_DELAY";

/// Gives pages back to the kernel as soon as they empty, for the commands
/// that keep running (`run`, `demo`). mimalloc keeps an emptied page for
/// `purge_delay` (1 s in its v3) and gives it back only when some thread
/// next frees a page, which an idle proxy does not: a reload's parse of a
/// 1 000-route file left 15-30 MiB resident for good (RESULTS.md, sessions
/// 38-39). mimalloc reads its options from the environment before `main`,
/// and veer has no safe call to set them, so the process executes itself
/// again (same PID, same arguments, `/proc/self/exe`: the same binary even
/// if its file was replaced) with `MIMALLOC_PURGE_DELAY=0` added. A value
/// the operator set is kept as it is. Runs before any thread starts; when
/// the exec fails (no `/proc`, a sandbox that forbids it), veer carries on
/// with mimalloc's default and says so once logging is up.
fn purge_pages_promptly() -> Option<std::io::Error> {
    use std::os::unix::process::CommandExt;
    if std::env::var_os(PURGE_DELAY).is_some() {
        return None;
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "veer".into());
    let exe = match std::fs::metadata("/proc/self/exe") {
        Ok(_) => PathBuf::from("/proc/self/exe"),
        Err(_) => match std::env::current_exe() {
            Ok(p) => p,
            Err(e) => return Some(e),
        },
    };
    // Only returns when it failed.
    Some(
        std::process::Command::new(exe)
            .arg0(arg0)
            .args(args)
            .env(PURGE_DELAY, "0")
            .exec(),
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let exec_failed = match cli.command {
        Command::Run { .. } | Command::Demo { .. } => purge_pages_promptly(),
        _ => None,
    };
    let logs = init_logs(cli.log_format);
    if let Some(e) = exec_failed {
        tracing::warn!(
            error = %e,
            "could not restart with {PURGE_DELAY}=0 (pages a reload empties may stay resident); set it in veer's environment"
        );
    }
    let result = match cli.command {
        Command::Run { config } => run_proxy(config),
        Command::Check { config } => return check::check(&config),
        Command::Demo {
            duration,
            upstreams_only,
        } => runtime(0).and_then(|rt| {
            rt.block_on(demo::demo(duration, upstreams_only))
                .map_err(Into::into)
        }),
        Command::Health { admin } => {
            runtime(1).and_then(|rt| rt.block_on(status::health(&admin)).map_err(Into::into))
        }
        Command::Status {
            admin,
            token_file,
            config,
        } => {
            // The config's token only where reads need it.
            let given = token_file.is_some();
            admin_of(admin, token_file, config.as_deref()).and_then(|(admin, token, reads)| {
                print_status(&admin, token.filter(|_| given || reads))
            })
        }
        Command::Revert(a) => act("revert", a),
        Command::Reset(a) => act("reset", a),
        Command::Pause(a) => act("pause", a),
        Command::Resume(a) => act("resume", a),
        Command::Promote(a) => act("promote", a),
        Command::Import(Import::IngressNginx { tls_dir, files }) => {
            let options = veer_proxy::import::Options {
                tls_dir: tls_dir.map(|d| d.display().to_string()),
            };
            return import_ingress_nginx(&files, &options);
        }
    };
    // The access log's last batch and the log lines still queued, before
    // the error that ends the run (which was, on a busy machine, printed
    // before lines logged ahead of it).
    veer_proxy::access::flush();
    drop(logs);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("veer: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// `e` and its causes, each said once: most of veer's errors say their
/// cause in their own words (`binding ADDR: Address already in use`),
/// which `{:#}` would say again after them.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if out.contains(&said) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&said);
    }
    out
}

fn import_ingress_nginx(files: &[PathBuf], options: &veer_proxy::import::Options) -> ExitCode {
    let mut inputs = Vec::new();
    for f in files {
        let read = if f.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())
        } else {
            std::fs::read_to_string(f)
        };
        match read {
            Ok(text) => inputs.push((f.display().to_string(), text)),
            Err(e) => {
                eprintln!("veer: {}: {e}", f.display());
                return ExitCode::FAILURE;
            }
        }
    }
    match veer_proxy::import::ingress_nginx(&inputs, options) {
        Ok(imported) => {
            print!("{}", imported.config);
            for n in &imported.notes {
                eprintln!("veer import: {n}");
            }
            eprintln!(
                "veer import: {} route(s) written; {} note(s) above need a look (also comments in the output)",
                imported.routes,
                imported.notes.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("veer import: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_status(admin: &str, token_file: Option<PathBuf>) -> anyhow::Result<()> {
    let token = match token_file {
        Some(p) => Some(veer_proxy::token::read(&p)?),
        None => None,
    };
    let rt = runtime(1)?;
    rt.block_on(status::print(admin, token.as_deref()))?;
    Ok(())
}

/// The admin address and token file: those given, else the config's
/// (`[admin] listen`, a wildcard address asked on loopback; `token_file`,
/// else `[state] dir`/admin.token), else 127.0.0.1:9901 and none; and
/// whether the config asks for the token on reads (`read_token`).
fn admin_of(
    admin: Option<String>,
    token_file: Option<PathBuf>,
    config: Option<&std::path::Path>,
) -> anyhow::Result<(String, Option<PathBuf>, bool)> {
    let Some(path) = config else {
        return Ok((
            admin.unwrap_or_else(|| "127.0.0.1:9901".into()),
            token_file,
            false,
        ));
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let c = veer_control::config::Config::parse(&text, &veer_proxy::reload::base_dir(path))
        .map_err(|d| anyhow::anyhow!("{}", d.render(path).trim_end()))?;
    let mut listen = c.admin.listen;
    if listen.ip().is_unspecified() {
        listen.set_ip(if listen.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let token = c
        .admin
        .token_file
        .clone()
        .unwrap_or_else(|| c.state.dir.join("admin.token"));
    Ok((
        admin.unwrap_or_else(|| listen.to_string()),
        token_file.or(Some(token)),
        c.admin.read_token,
    ))
}

fn act(action: &str, a: ActionArgs) -> anyhow::Result<()> {
    let (admin, token_file, _) = admin_of(a.admin, a.token_file, a.config.as_deref())?;
    let Some(token_file) = token_file else {
        anyhow::bail!("an action needs the admin token: pass --token-file, or --config with the proxy's config file");
    };
    let token = veer_proxy::token::read(&token_file)?;
    let by = a.by.or_else(whoami);
    let rt = runtime(1)?;
    let line = rt.block_on(status::act(
        &admin,
        &token,
        (&a.route, action),
        by.as_deref(),
        a.reason.as_deref(),
    ))?;
    println!("{line}");
    Ok(())
}

/// `$USER@HOSTNAME`, as far as they are known.
fn whoami() -> Option<String> {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    Some(if host.is_empty() {
        user
    } else {
        format!("{user}@{host}")
    })
}

fn run_proxy(path: PathBuf) -> anyhow::Result<()> {
    let loaded = run::load_at_start(&path)?;
    let rt = runtime(loaded.config.proxy.workers)?;
    rt.block_on(run::run(loaded, terminated(), None))?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Causes already said by the error before them are not said again;
    /// others are.
    #[test]
    fn an_error_says_each_cause_once() {
        let bind = veer_proxy::run::RunError::Bind {
            addr: ([127, 0, 0, 1], 80).into(),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        let said = report(&anyhow::Error::from(bind));
        assert_eq!(said, "binding 127.0.0.1:80: address in use");
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let said = report(&anyhow::Error::from(io).context("reading the token"));
        assert_eq!(said, "reading the token: entity not found");
    }

    /// `--config` gives the admin address (a wildcard one asked on
    /// loopback) and the token file; flags given win.
    #[test]
    fn the_admin_address_and_token_come_from_the_config_unless_given() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("veer.toml");
        let config = |admin: &str, token: &str| {
            format!("[admin]\nlisten = \"{admin}\"\n{token}[state]\ndir = \"state\"\n[[route]]\nname = \"web\"\n[route.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:9000\"]\n")
        };
        std::fs::write(
            &path,
            config("0.0.0.0:9911", "token_file = \"t\"\nread_token = true\n"),
        )
        .expect("write");
        let (admin, token, reads) = admin_of(None, None, Some(&path)).expect("config");
        assert_eq!(admin, "127.0.0.1:9911");
        assert_eq!(token, Some(dir.path().join("t")));
        assert!(reads);
        std::fs::write(&path, config("[::]:9912", "token_file = \"t\"\n")).expect("write");
        let (admin, _, reads) = admin_of(None, None, Some(&path)).expect("config");
        assert_eq!(admin, "[::1]:9912");
        assert!(!reads);
        std::fs::write(&path, config("127.0.0.1:9913", "")).expect("write");
        let (admin, token, _) =
            admin_of(Some("10.0.0.1:1".into()), None, Some(&path)).expect("config");
        assert_eq!(admin, "10.0.0.1:1");
        assert_eq!(token, Some(dir.path().join("state/admin.token")));
        let (admin, token, _) = admin_of(None, None, None).expect("none");
        assert_eq!((admin.as_str(), token), ("127.0.0.1:9901", None));
        std::fs::write(&path, "[[route]]\nname = \"Bad\"\n").expect("write");
        assert!(admin_of(None, None, Some(&path)).is_err());
    }
}
