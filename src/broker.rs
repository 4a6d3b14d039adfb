//! Wiring: start everything, wait for the shutdown signal, stop in order.
//!
//! Shutdown order (NATS lame-duck order): stop accepting (`hello` is
//! removed first), cancel every session, let each flush its backlog and a
//! final `BYE` within the grace period, wait for all tasks under an overall
//! deadline, then remove what the broker created. Every FIFO is open
//! non-blocking, so nothing can be stuck in `open()` along the way.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acl::{AclError, Policy};
use crate::busdir::{BusDir, BusDirError};
use crate::config::BrokerConfig;
use crate::context::Context;
use crate::counters::Counters;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::router::RouterHandle;
use crate::state::StateStore;
use crate::throttle::LogThrottle;
use crate::watch::FsWatcher;
use crate::{http, rendezvous};

/// The whole shutdown must fit in the 2 seconds promised to operators.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_millis(1500);
/// Descriptors kept for the broker itself (hello, inotify, epoll, logs,
/// metrics connections) and for the reply FIFOs of pending handshakes.
const RESERVED_FDS: u64 = 64 + rendezvous::MAX_PENDING_HANDSHAKES as u64;
/// Per client: send, recv, and a pidfd when `pid=` was given.
const FDS_PER_CLIENT: u64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    BusDir(#[from] BusDirError),
    #[error("{0}; fix the file or start without --acl")]
    Acl(#[from] AclError),
    #[error("cannot watch {dir} with inotify: {source}")]
    Inotify {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// The bus directory was removed or renamed while the broker ran.
    #[error("the bus directory {dir} was removed or renamed while the broker ran; every client directory went with it, so the broker stopped (start it again, or let its supervisor restart it: Restart=on-failure)")]
    BusDirGone { dir: PathBuf },
    #[error(transparent)]
    MetricsToken(#[from] crate::metrics_token::TokenError),
    #[error(transparent)]
    Replace(#[from] crate::control::ReplaceError),
    #[error("cannot serve metrics on {addr}: {source} (an explicit --metrics-addr never falls back, so a scraper configured for it never reaches another broker; choose a free HOST:PORT, leave --metrics-addr out to take 127.0.0.1:9478 or else a free port recorded in metrics.addr, or give --metrics-addr off)")]
    MetricsAddr {
        addr: String,
        source: std::io::Error,
    },
}

/// Runs a broker on `config.dir` until `shutdown` resolves.
///
/// # Errors
/// When the bus directory cannot be set up (locked, not ours, ...): the
/// error says what to do. Once serving, problems with single clients are
/// logged and never end the broker.
pub async fn run(
    config: BrokerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BrokerError> {
    serve(config, shutdown, None).await
}

/// [`run`], rereading the `--acl` file each time `reload` receives (the
/// binary sends on SIGHUP). A bad file is logged with its line number and
/// the policy in force stays.
///
/// # Errors
/// As [`run`].
pub async fn run_reloadable(
    config: BrokerConfig,
    shutdown: impl Future<Output = ()>,
    reload: mpsc::Receiver<()>,
) -> Result<(), BrokerError> {
    serve(config, shutdown, Some(reload)).await
}

async fn serve(
    config: BrokerConfig,
    shutdown: impl Future<Output = ()>,
    reload: Option<mpsc::Receiver<()>>,
) -> Result<(), BrokerError> {
    // Before anything is created: a bad ACL means no broker.
    let policy = match &config.acl {
        Some(path) => {
            let policy = crate::acl::load(path)?;
            tracing::info!(
                "acl loaded from {}: {} rules, default {}",
                path.display(),
                policy.rule_count(),
                if policy.default_allows() {
                    "allow"
                } else {
                    "deny"
                }
            );
            Arc::new(policy)
        }
        None => Arc::new(Policy::open()),
    };
    let fd_limit = raise_open_file_limit();
    let fd_clients = client_capacity(fd_limit);
    let max_clients = config.max_clients.map_or(fd_clients, |m| m.min(fd_clients));
    // Before touching the bus directory: a token file we may not trust
    // stops the broker with nothing to clean up.
    let metrics_token = config
        .metrics_token_file
        .as_deref()
        .map(crate::metrics_token::BearerToken::load_private)
        .transpose()?;

    let (mut bus, stale) = if config.replace {
        open_replacing(&config).await?
    } else {
        BusDir::open(&config.dir, config.mode, config.shared)?
    };
    if config.replace {
        tracing::info!(
            "took over from the broker{} (serve --replace)",
            stale
                .previous_pid
                .map(|p| format!(" with pid {p}"))
                .unwrap_or_default()
        );
    } else if !stale.is_empty() {
        tracing::warn!(
            "cleaned up after a broker{} that did not stop cleanly: removed {}{} client director{}",
            stale
                .previous_pid
                .map(|p| format!(" (pid {p})"))
                .unwrap_or_default(),
            if stale.removed_hello {
                "the hello FIFO and "
            } else {
                ""
            },
            stale.removed_clients,
            if stale.removed_clients == 1 {
                "y"
            } else {
                "ies"
            },
        );
    }
    for kept in &stale.kept {
        tracing::warn!(
            "left {} alone: it is not a client directory of ours",
            kept.display()
        );
    }
    let listener = match http::bind(config.metrics).await {
        Ok(l) => l,
        Err(source) => {
            bus.remove();
            return Err(BrokerError::MetricsAddr {
                addr: match config.metrics {
                    crate::config::MetricsEndpoint::At(a) => a.to_string(),
                    _ => crate::config::DEFAULT_METRICS_ADDR.to_owned(),
                },
                source,
            });
        }
    };
    let limits = config.metrics_limits;
    let counters = if limits.topic_labels {
        Counters::new(limits.topics)
    } else {
        Counters::without_topic_labels()
    };
    counters.memory.set_limit(config.max_memory);
    let clients = if limits.client_labels {
        Registry::new(max_clients, limits.clients, counters.clone())
    } else {
        Registry::without_client_labels(max_clients, counters.clone())
    };
    let watcher = match FsWatcher::new(&bus.fd_path(), bus.path(), clients.clone()) {
        Ok(w) => w,
        Err(source) => {
            let dir = bus.path().to_owned();
            bus.remove();
            return Err(BrokerError::Inotify { dir, source });
        }
    };
    tokio::spawn(watcher.clone().run());

    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let metrics_addr = match listener {
        Some(l) => {
            let addr = l.local_addr().ok();
            let metrics = Metrics::new(counters.clone(), clients.clone());
            tokio::spawn(http::serve(l, metrics, metrics_token, cancel.clone()));
            if let Some(a) = addr {
                if let Err(e) = bus.write_metrics_addr(a) {
                    tracing::warn!("cannot record the metrics address: {e}");
                }
            }
            addr
        }
        None => None,
    };
    let state_changed = Arc::new(tokio::sync::Notify::new());
    let router = RouterHandle::spawn_tracking(
        counters.clone(),
        config.max_subscriptions,
        config.retain,
        Some(state_changed.clone()),
    );
    let state = StateStore::new(bus.take_state(), counters.clone());
    let ctx = Arc::new(Context {
        router,
        state,
        phase: tokio::sync::watch::channel(crate::context::Phase::Serving).0,
        paused_readers: std::sync::atomic::AtomicUsize::new(0),
        handshakes: std::sync::atomic::AtomicUsize::new(0),
        clients,
        watcher,
        counters,
        cancel,
        tracker: tracker.clone(),
        clients_dir: bus.clients_dir(),
        fs: bus.fs(),
        throttle: LogThrottle::default(),
        policy: std::sync::RwLock::new(policy.clone()),
        config,
    });
    if !policy.is_open() {
        // In force before `hello` exists, so before any client.
        ctx.router.set_policy(policy).await;
    }
    if let Some(reload) = reload {
        tokio::spawn(reload_acl_on(reload, ctx.clone()));
    }
    // Before any client is adopted or accepted: a subscription made from
    // now on gets them.
    load_retained(&ctx).await;
    let state_writer = tokio::spawn(crate::state::run_writer(
        ctx.state.clone(),
        ctx.router.clone(),
        state_changed,
        ctx.cancel.clone(),
    ));
    tracing::info!(
        "clients may hold {} MiB in the broker (--max-memory), then the overflow policy applies to the largest backlogs",
        ctx.config.max_memory >> 20
    );
    let pipe_budget = pipe_budget_clients(crate::fifo::min_pipe_size(), ctx.config.pipe_size);
    tracing::info!(
        "serving on {} (pid {}); open-file limit {fd_limit} allows about {max_clients} clients; {}; metrics {}",
        bus.path().display(),
        std::process::id(),
        pipe_budget.map_or_else(
            || format!("client pipes of one page, growing to {} bytes under load", ctx.config.pipe_size),
            |(idle, busy)| format!("client pipes of one page, growing to {} bytes under load: fs.pipe-user-pages-soft holds about {idle} idle clients, or {busy} at full size", ctx.config.pipe_size)
        ),
        metrics_addr.map_or_else(
            || "off".to_owned(),
            |a| format!(
                "on http://{a}/metrics{}{}",
                if ctx.config.metrics_token_file.is_some() { " (bearer token required)" } else { "" },
                match (limits.topic_labels, limits.client_labels) {
                    (true, true) => "",
                    (false, true) => " without topic names",
                    (true, false) => " without client names",
                    (false, false) => " without topic or client names",
                }
            )
        ),
    );
    let control = crate::control::bind(&ctx);
    adopt_all(bus.take_adoptable(), &stale, &ctx).await;
    if let Some(listener) = control {
        tokio::spawn(crate::control::listen(listener, ctx.clone()));
    }
    // Last: `hello` appearing is what clients and scripts wait for.
    if let Err(e) = bus.publish_hello() {
        let path = bus.path().join(crate::busdir::HELLO);
        bus.remove();
        return Err(BusDirError::Io {
            action: "create",
            path,
            source: e,
        }
        .into());
    }
    // For systemd Type=notify units; a no-op elsewhere. A replacement is
    // the unit's main process from now on (NotifyAccess=all).
    if ctx.config.replace {
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::MainPid(std::process::id()),
            sd_notify::NotifyState::Ready,
        ]);
    } else {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }
    // After MAINPID=: the waiting `--detach` command exits when told, and
    // systemd must know the new main process by then.
    if let Some(ready) = &ctx.config.ready {
        ready.signal();
    }
    let bus_path = bus.path().to_owned();
    let rendezvous = tracker.spawn(rendezvous::run(bus, ctx.clone()));

    let gone = tokio::select! {
        () = shutdown => false,
        () = ctx.watcher.bus_dir_gone() => true,
    };
    if gone {
        tracing::error!(
            "the bus directory {} was removed or renamed; stopping (exit status 1, so that a supervisor restarts the broker)",
            bus_path.display()
        );
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!(clients = ctx.clients.len(), "shutting down");
    ctx.cancel.cancel();
    tracker.close();
    let bus = rendezvous.await;
    let _ = state_writer.await;
    if tokio::time::timeout(SHUTDOWN_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "{} tasks still running after {SHUTDOWN_DEADLINE:?}; exiting anyway",
            tracker.len()
        );
    }
    match bus {
        Ok(bus) => {
            // A stop ends every client and removes the bus directory: the
            // retained messages go with it (they outlive a crash or a
            // `--replace`, not a stop). The writer has stopped: nothing
            // writes the file again.
            ctx.state.dir().remove(crate::state::RETAINED);
            bus.remove()
        }
        Err(e) => tracing::error!("the rendezvous task failed: {e}; bus directory left as is"),
    }
    tracing::info!("stopped");
    if gone {
        return Err(BrokerError::BusDirGone { dir: bus_path });
    }
    Ok(())
}

/// Loads the retained messages the previous broker left in
/// `<bus>/state/retained`. An unusable file is reported and set aside: the
/// broker starts with no retained messages rather than not at all.
async fn load_retained(ctx: &Arc<Context>) {
    let path = ctx.state.dir().path().join(crate::state::RETAINED);
    let msgs = match ctx.state.dir().read_retained() {
        Ok(msgs) => msgs,
        Err(why) => {
            tracing::error!(
                "ignoring the retained messages in {}: {why}; starting with none (the file is replaced at the next RETAIN)",
                path.display()
            );
            return;
        }
    };
    if msgs.is_empty() {
        return;
    }
    let n = msgs.len();
    let Some(left_out) = ctx.router.load_retained(msgs).await else {
        return;
    };
    tracing::info!(
        "loaded {} retained messages from {}",
        n - left_out.len(),
        path.display()
    );
    for what in left_out {
        tracing::warn!(
            "retained message on {what}: left out (raise the limit and RETAIN it again)"
        );
    }
}

/// `serve --replace`: asks the running broker to hand over, opens `hello`
/// and every client's FIFOs while it still holds them, lets it exit, then
/// takes the lock (released by its exit, possibly a moment after its end
/// of the control socket closed).
async fn open_replacing(
    config: &BrokerConfig,
) -> Result<(BusDir, crate::busdir::StaleCleanup), BrokerError> {
    let stream = crate::control::request(&config.dir).await?;
    // On an error from here, dropping the stream before GO makes the old
    // broker resume.
    let pre = crate::busdir::preopen(&config.dir, config.shared)?;
    tracing::info!(
        "the running broker is paused; holding hello and {} clients' FIFOs",
        pre.clients()
    );
    crate::control::go(stream).await?;
    // Its lock goes with its last descriptor: wait until the process is
    // gone, not only its end of the socket.
    if let Some(pid) = pre.previous_pid() {
        if let Ok(w) = crate::watch::PidWatch::open(pid) {
            tokio::time::timeout(crate::control::ANSWER, w.exited())
                .await
                .map_err(|_| crate::control::ReplaceError::Timeout("exit after GO"))?;
        }
    }
    Ok(BusDir::open_with(
        &config.dir,
        config.mode,
        config.shared,
        Some(pre),
    )?)
}

/// Serves again the clients a crashed broker left (their FIFOs were
/// opened by `BusDir::open`), removes those that cannot be, and logs the
/// count: before `hello` exists, so before any new client.
async fn adopt_all(
    found: Vec<crate::busdir::Adoptable>,
    stale: &crate::busdir::StaleCleanup,
    ctx: &Arc<Context>,
) {
    for r in &stale.rejected {
        tracing::warn!(
            "not adopting {}: {}; that client is removed",
            r.path.display(),
            r.why
        );
    }
    if found.is_empty() && stale.rejected.is_empty() {
        return;
    }
    let handover = found.iter().any(|a| a.handover);
    let (mut adopted, mut removed) = (0usize, stale.rejected.len());
    let mut sessions = Vec::new();
    for a in found {
        let uuid = a.record.uuid.clone();
        match crate::session::adopt(a, ctx).await {
            Ok(s) => {
                adopted += 1;
                sessions.push(s);
            }
            Err(why) => {
                removed += 1;
                tracing::info!("client {uuid} not adopted: {why}; removed");
                ctx.state.dir().remove(&uuid);
                let clients = ctx.fs.clients();
                if let Err(e) = crate::busdir::remove_client_dir(
                    std::os::fd::AsRawFd::as_raw_fd(&*clients),
                    &uuid,
                ) {
                    tracing::warn!(
                        "cannot remove {}: {e}",
                        ctx.fs.clients_path().join(&uuid).display()
                    );
                }
            }
        }
    }
    // Only now that every subscription is back: what a client wrote
    // meanwhile reaches every subscriber.
    for s in sessions {
        ctx.tracker.spawn(s.run(ctx.clone()));
    }
    if handover {
        tracing::info!(
            "took over {adopted} client{} from the previous broker, removed {removed}",
            if adopted == 1 { "" } else { "s" }
        );
        return;
    }
    tracing::info!(
        "after a broker crash: adopted {adopted} client{} (each first reads 'DROPPED ? restart'), removed {removed}",
        if adopted == 1 { "" } else { "s" }
    );
}

/// Rereads the ACL each time `reload` receives, until shutdown.
async fn reload_acl_on(mut reload: mpsc::Receiver<()>, ctx: Arc<Context>) {
    loop {
        tokio::select! {
            () = ctx.cancel.cancelled() => return,
            r = reload.recv() => if r.is_none() { return },
        }
        let Some(path) = ctx.config.acl.clone() else {
            tracing::info!("SIGHUP: no --acl file to reload; nothing changes");
            continue;
        };
        // Reading the file and resolving names (NSS) may block.
        let p = path.clone();
        let loaded = match tokio::task::spawn_blocking(move || crate::acl::load(&p)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(
                    "acl {}: reload failed: {e}; keeping the previous policy",
                    path.display()
                );
                continue;
            }
        };
        match loaded {
            Ok(policy) => {
                let rules = policy.rule_count();
                let policy = Arc::new(policy);
                *ctx.policy.write().unwrap_or_else(|p| p.into_inner()) = policy.clone();
                ctx.router.set_policy(policy).await;
                tracing::info!("acl reloaded from {}: {rules} rules", path.display());
            }
            Err(e) => tracing::error!("{e}; keeping the previous policy"),
        }
    }
}

/// How many clients fit in the user's pipe budget (`fs.pipe-user-pages-soft`,
/// shared by all the user's pipes) with both FIFOs at one page (idle), and
/// with both at their largest (`--pipe-size`). `None` when there is no soft
/// limit. Past the budget, an unprivileged broker's FIFOs can no longer grow,
/// and the user's other programs get one-page pipes.
fn pipe_budget_clients(page: usize, pipe_size: usize) -> Option<(usize, usize)> {
    let pages: usize = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let bytes = pages * page;
    (pages > 0).then(|| (bytes / (2 * page), bytes / (2 * pipe_size.max(page))))
}

/// How many clients an open-file limit allows.
pub fn client_capacity(fd_limit: u64) -> usize {
    (fd_limit.saturating_sub(RESERVED_FDS) / FDS_PER_CLIENT) as usize
}

/// Raises the open-file limit as far as allowed: to the hard limit, and as
/// root beyond it, up to `fs.nr_open`. Each client costs descriptors, so
/// this is how many clients the broker can take. Returns the soft limit.
pub fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    if nr_open > hard && setrlimit(Resource::RLIMIT_NOFILE, nr_open, nr_open).is_ok() {
        return nr_open;
    }
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}
