//! The `fifobus` binary: parse the command line, set up logging, hand over
//! to the library. No logic lives here.

use std::process::ExitCode;

use clap::Parser;
use fifobus::cli::{BenchArgs, BridgeArgs, Cli, Command, ServeArgs, StatsArgs};
use fifobus::{broker, busdir, commands, config::BrokerConfig, requests, router::BacklogLimits};
use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let dir = cli.dir.unwrap_or_else(busdir::default_path);
    let result = match &cli.command {
        Command::Serve(args) => {
            init_logging("info");
            return serve(dir, args);
        }
        Command::Connect(args) => commands::connect(&dir, args),
        Command::Pub(args) => commands::publish(&dir, args),
        Command::Sub(args) => commands::subscribe(&dir, args),
        Command::Stats(args) => return stats(&dir, args),
        Command::Bench(args) => return bench(args),
        Command::Bridge(args) => return bridge(&dir, args),
        Command::Req(args) => requests::request(&dir, args),
        Command::Reply(args) => requests::reply(&dir, args),
        Command::Ls(args) => requests::ls(&dir, args),
    };
    result.unwrap_or_else(|e| match e {
        // Killed during the handshake, the reply directory already removed:
        // die of the signal, as the parent expects.
        commands::CommandError::Client(fifobus::client::ClientError::Interrupted(sig)) => {
            fifobus::client::die_of(sig)
        }
        e => {
            eprintln!("fifobus: {e}");
            ExitCode::FAILURE
        }
    })
}

/// `--max-memory`'s default, from what this machine (or the cgroup the
/// broker runs in) has; the rule is [`fifobus::config::default_max_memory`].
/// `/proc` is read through procfs: MemTotal in bytes, and the cgroup v2
/// path (hierarchy 0) whose memory.max bounds us.
fn machine_memory_budget() -> usize {
    use fifobus::config::{default_max_memory, parse_memory_max};
    use procfs::Current;
    let total = procfs::Meminfo::current()
        .ok()
        .and_then(|m| usize::try_from(m.mem_total).ok());
    let cgroup = procfs::process::Process::myself()
        .and_then(|p| p.cgroups())
        .ok()
        .and_then(|groups| {
            groups
                .into_iter()
                .find(|g| g.hierarchy == 0)
                .map(|g| g.pathname)
        })
        .and_then(|path| {
            std::fs::read_to_string(format!(
                "/sys/fs/cgroup{}/memory.max",
                path.trim_end_matches('/')
            ))
            .ok()
        })
        .and_then(|t| parse_memory_max(&t));
    default_max_memory(total, cgroup)
}

fn serve(dir: std::path::PathBuf, args: &ServeArgs) -> ExitCode {
    if args.detach {
        return detach();
    }
    let ready = match args.ready_fd.map(fifobus::control::ReadyPipe::adopt) {
        None => None,
        Some(Ok(pipe)) => Some(pipe),
        Some(Err(e)) => {
            warn(format_args!("error: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let config = BrokerConfig {
        mode: args.mode.unwrap_or(if args.shared { 0o755 } else { 0o700 }),
        shared: args.shared,
        max_line: args.max_line,
        backlog: BacklogLimits {
            messages: args.backlog_messages,
            bytes: args.backlog_bytes,
            policy: args.overflow,
        },
        handshake_timeout: args.handshake_timeout,
        max_clients: args.max_clients,
        orphan_timeout: args.orphan_timeout,
        pipe_size: args.pipe_size,
        pipe_idle: args.pipe_idle,
        metrics: args.metrics_addr,
        metrics_limits: fifobus::config::MetricsLimits {
            topics: args.metrics_topic_limit,
            clients: args.metrics_client_limit,
            topic_labels: args.metrics_topic_labels,
            client_labels: args.metrics_client_labels,
        },
        metrics_token_file: args.metrics_token_file.clone(),
        acl: args.acl.clone(),
        max_memory: args.max_memory.unwrap_or_else(machine_memory_budget),
        max_subscriptions: args.max_subscriptions,
        replace: args.replace,
        ready,
        retain: fifobus::router::RetainLimits {
            messages: args.max_retained,
            bytes: args.max_retained_bytes,
        },
        ..BrokerConfig::new(dir)
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn(format_args!("error: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Install the handlers before the broker announces itself, so a
        // signal sent the moment `hello` appears already stops it cleanly.
        let (mut term, mut int, mut hup) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(t), Ok(i), Ok(h)) => (t, i, h),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                warn(format_args!("error: cannot install signal handlers: {e}"));
                return Ok(false);
            }
        };
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        // SIGHUP rereads the --acl file.
        let (reload_tx, reload) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                // A reload already pending covers this signal too.
                let _ = reload_tx.try_send(());
            }
        });
        broker::run_reloadable(config, shutdown, reload)
            .await
            .map(|()| true)
    });
    // Do not wait for tasks that ignored the shutdown deadline.
    runtime.shutdown_background();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            warn(format_args!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// `serve --replace --detach` (systemd's `ExecReload=`, which must exit
/// while the new broker lives on as the service's main process).
///
/// Re-executes `/proc/self/exe` (the binary this command was started from,
/// so the newly installed one) with the same arguments minus `--detach`,
/// plus `--ready-fd` naming the write end of a pipe, rather than forking:
/// a fork must happen before any thread exists and must not touch the
/// parent's state afterwards, while a fresh process starts clean (its own
/// runtime, signal handlers, logging) and takes the same path as a plain
/// `serve --replace`. The new broker writes `READY` on the pipe after its
/// sd-notify `MAINPID=` and `READY=1`; its end closing without that means
/// it failed, and its error is on the stderr both share. Its stdout and
/// stderr are this command's (the journal, under systemd).
fn detach() -> ExitCode {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let (rd, wr) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            warn(format_args!("error: --detach: cannot create a pipe: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let wr_fd = wr.as_raw_fd();
    let args = std::env::args_os().skip(1).filter(|a| a != "--detach");
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.args(args)
        .arg("--ready-fd")
        .arg(wr_fd.to_string())
        .stdin(std::process::Stdio::null())
        // Out of this command's process group: a terminal's Ctrl-C for the
        // command that already returned must not reach the broker.
        .process_group(0);
    // SAFETY: only fcntl, which is async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            use nix::fcntl::{fcntl, FcntlArg, FdFlag};
            fcntl(wr_fd, FcntlArg::F_SETFD(FdFlag::empty()))
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            warn(format_args!(
                "error: --detach: cannot start the new broker (/proc/self/exe): {e}"
            ));
            return ExitCode::FAILURE;
        }
    };
    // Only the child holds the write end now: EOF comes when it has served
    // (after READY) or died.
    drop(wr);
    let mut said = String::new();
    let _ = std::fs::File::from(rd).read_to_string(&mut said);
    if said.trim() == "READY" {
        return ExitCode::SUCCESS;
    }
    let status = match child.wait() {
        Ok(s) => s,
        Err(e) => {
            warn(format_args!(
                "error: --detach: the new broker (pid {}) did not say it serves, and waiting for it failed: {e}",
                child.id()
            ));
            return ExitCode::FAILURE;
        }
    };
    warn(format_args!(
        "error: --detach: the new broker exited before it served ({status}); its error is above"
    ));
    // Its own status when it has one, else (killed, or 0 without READY)
    // a plain failure.
    match status.code() {
        Some(c @ 1..=255) => ExitCode::from(c as u8),
        _ => ExitCode::FAILURE,
    }
}

/// A line on stderr that may be lost: `eprintln!` panics when stderr is a
/// pipe whose reader is gone (`fifobus serve 2>&1 | tee log`, then Ctrl-C),
/// and the broker must still stop cleanly then.
fn warn(line: std::fmt::Arguments) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// `fifobus bench ARGS...`: runs `fifobus-bench ARGS...`, a crate of its own
/// (crates/bench). It measures this very broker unless
/// `FIFOBUS_BENCH_BROKER` names another.
fn bench(args: &BenchArgs) -> ExitCode {
    let mut env = Vec::new();
    if std::env::var_os("FIFOBUS_BENCH_BROKER").is_none() {
        if let Ok(exe) = std::env::current_exe() {
            env.push(("FIFOBUS_BENCH_BROKER", exe.into_os_string()));
        }
    }
    run_companion("fifobus-bench", "the benchmark", &args.args, &env)
}

/// `fifobus bridge ARGS...`: runs `fifobus-bridge ARGS...` (crates/bridge,
/// kept out of this binary with its NATS client and TLS stack) on this bus:
/// the bus directory goes in `FIFOBUS_DIR`, which its `--dir` defaults to.
fn bridge(dir: &std::path::Path, args: &BridgeArgs) -> ExitCode {
    let env = [("FIFOBUS_DIR", dir.as_os_str().to_owned())];
    run_companion("fifobus-bridge", "the NATS bridge", &args.args, &env)
}

/// Replaces this process with `name ARGS...`, a program of this workspace
/// built beside this executable (the same cargo target directory), else
/// found on PATH. Returns only on failure, having said what to build.
fn run_companion(
    name: &str,
    what: &str,
    args: &[std::ffi::OsString],
    env: &[(&str, std::ffi::OsString)],
) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().ok();
    let beside = exe
        .as_deref()
        .and_then(std::path::Path::parent)
        .map(|d| d.join(name))
        .filter(|p| p.is_file());
    let e = std::process::Command::new(beside.as_deref().unwrap_or(name.as_ref()))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .exec();
    if e.kind() == std::io::ErrorKind::NotFound {
        let release = exe
            .as_deref()
            .and_then(std::path::Path::parent)
            .and_then(std::path::Path::file_name)
            .is_none_or(|d| d != "debug");
        let flag = if release { " --release" } else { "" };
        eprintln!(
            "fifobus: {what} is a separate program, {name}, not found next to this one or on PATH; build it with `cargo build{flag} -p {name}`"
        );
    } else {
        eprintln!("fifobus: cannot run {name}: {e}");
    }
    ExitCode::FAILURE
}

fn stats(dir: &std::path::Path, args: &StatsArgs) -> ExitCode {
    use fifobus::stats;
    let run = || -> Result<String, stats::StatsError> {
        let url = match &args.url {
            Some(u) => u.clone(),
            None => stats::metrics_url(dir)?,
        };
        let token = args
            .metrics_token_file
            .as_deref()
            .map(fifobus::metrics_token::BearerToken::load)
            .transpose()?;
        let scrape = || {
            stats::scrape(&url, token.as_ref()).map_err(|e| match e {
                e if args.url.is_none() && e.is_refused() => stats::StatsError::NoBroker {
                    dir: dir.display().to_string(),
                    url: url.clone(),
                },
                e => e,
            })
        };
        let before = scrape()?;
        std::thread::sleep(args.interval);
        let now = scrape()?;
        let secs = args.interval.as_secs_f64().max(1e-3);
        Ok(format!(
            "fifobus on {} ({url}, rates over {:?})\n{}",
            dir.display(),
            args.interval,
            stats::render(&before, &now, secs, args.rows)
        ))
    };
    match run() {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fifobus: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        // Its default reports a failed write with `eprintln!`, which panics
        // on the same broken stderr: a lost log line must cost only itself.
        .log_internal_errors(false)
        .init();
}
