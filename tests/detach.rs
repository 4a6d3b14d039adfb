//! `fifobus serve --replace --detach` (issue 10, item 3, under systemd):
//! the command exits once the new broker serves in the background, as
//! `ExecReload=` must, and the new broker tells systemd it is the service's
//! main process (`MAINPID=`, `READY=1`).

mod common;

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fifobus::client::ConnectOptions;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The detached broker, an orphan re-parented to this process (a child
/// subreaper): killed and reaped on drop unless [`Detached::stop`] did.
struct Detached(Option<Pid>);

impl Detached {
    /// `SIGTERM`, then its exit status within [`T`] (polled: it is not a
    /// `Child` this process spawned).
    fn stop(&mut self) -> WaitStatus {
        let pid = self.0.take().unwrap();
        kill(pid, Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + T;
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)).unwrap() {
                WaitStatus::StillAlive if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                WaitStatus::StillAlive => {
                    let _ = kill(pid, Signal::SIGKILL);
                    let _ = waitpid(pid, None);
                    panic!("the detached broker did not stop within {T:?} of SIGTERM");
                }
                status => return status,
            }
        }
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
    }
}

/// Every datagram on `sock` until one holds `READY=1` (each read bounded by
/// [`T`]); returns that one.
fn ready_datagram(sock: &UnixDatagram) -> String {
    sock.set_read_timeout(Some(T)).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no READY=1 within {T:?} ({e}); got {seen:?}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.lines().any(|l| l == "READY=1") {
            return msg;
        }
        seen.push(msg);
    }
}

#[test]
fn replace_detach_exits_once_the_new_broker_serves_and_it_tells_systemd_its_pid() {
    // The detached broker outlives the command that started it: it is
    // re-parented to this process, which then reaps it.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let mut bus = TempBus::start();
    let mut sub = bus.connect_opts(ConnectOptions {
        name: Some("sub".into()),
        pid: Some(std::process::id() as i32),
        subs: vec![pattern("t")],
    });
    barrier(&mut sub);
    let notify_path = bus.tmp.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();

    let mut old = bus.child.take().unwrap();
    let log = fs::OpenOptions::new().append(true).open(&bus.log).unwrap();
    let mut cmd = Command::new(bin())
        .args([
            "serve",
            "--metrics-addr",
            "127.0.0.1:0",
            "--replace",
            "--detach",
            "--dir",
        ])
        .arg(&bus.dir)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let status = wait_child(&mut cmd, T * 3).unwrap_or_else(|| {
        let _ = cmd.kill();
        let _ = cmd.wait();
        panic!(
            "serve --replace --detach did not return:\n{}",
            bus.log_text()
        )
    });
    assert!(status.success(), "{status}:\n{}", bus.log_text());
    let old_status = wait_child(&mut old, T).expect("the old broker did not exit");
    assert!(old_status.success(), "the old broker exited {old_status}");

    // The bus's pid file names the detached broker: not the command, alive.
    let pid: i32 = fs::read_to_string(bus.dir.join("broker.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut new = Detached(Some(Pid::from_raw(pid)));
    assert_ne!(pid, cmd.id() as i32, "the command itself is the broker");
    assert_ne!(pid, old.id() as i32);
    assert!(
        kill(Pid::from_raw(pid), None).is_ok(),
        "broker {pid} is gone"
    );

    // It told systemd, in one message, that it is the main process and ready.
    let msg = ready_datagram(&notify);
    assert!(
        msg.lines().any(|l| l == format!("MAINPID={pid}")),
        "{msg:?} (new broker {pid})"
    );

    // The client connected before serves on, nothing noticed.
    let mut p = bus.connect("p", &[]);
    p.send_raw(b"PUB t after\n").unwrap();
    barrier(&mut p);
    assert_eq!(barrier(&mut sub), vec!["MSG t after"]);

    // SIGTERM still means stop and say BYE.
    let stopped = new.stop();
    assert_eq!(stopped, WaitStatus::Exited(Pid::from_raw(pid), 0));
    assert!(read_until(&mut sub, "BYE").is_empty());
}

#[test]
fn replace_detach_without_a_running_broker_exits_non_zero_with_the_error() {
    let dir = temp_root();
    let out = Command::new(bin())
        .args([
            "serve",
            "--replace",
            "--detach",
            "--metrics-addr",
            "off",
            "--dir",
        ])
        .arg(dir.path().join("bus"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("no broker to replace")
            && err.contains("start without --replace")
            && err.contains("--detach: the new broker exited before it served"),
        "{err}"
    );
}

#[test]
fn detach_needs_replace() {
    let dir = temp_root();
    let out = Command::new(bin())
        .args(["serve", "--detach", "--metrics-addr", "off", "--dir"])
        .arg(dir.path().join("bus"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--replace"), "{err}");
    assert!(!dir.path().join("bus").exists(), "a broker started");
}
