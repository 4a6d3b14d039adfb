//! The rendezvous: HELLO lines, reply FIFOs, refusals.

mod common;

use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Instant;

use common::*;
use fifobus::client::{Client, ClientError, ConnectOptions};
use fifobus::protocol::{ErrorCode, Reply};
use nix::sys::stat::Mode;

fn write_hello(bus: &TempBus, line: &str) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(bus.dir.join("hello"))
        .unwrap();
    f.write_all(line.as_bytes()).unwrap();
}

/// Opens a FIFO for reading without blocking and returns a line reader on it.
fn reply_reader(path: &Path) -> OwnedFd {
    nix::unistd::mkfifo(path, Mode::from_bits_truncate(0o600)).unwrap();
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .unwrap()
        .into()
}

fn read_reply_lines(fd: &OwnedFd, n: usize) -> Vec<String> {
    let mut buf = Vec::new();
    let deadline = Instant::now() + T;
    while buf.iter().filter(|&&b| b == b'\n').count() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "only got {:?}",
            String::from_utf8_lossy(&buf)
        );
        let mut fds = [nix::poll::PollFd::new(
            fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(
            &mut fds,
            nix::poll::PollTimeout::try_from(left.as_millis() as i32).unwrap(),
        );
        let mut chunk = [0u8; 65536];
        match nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(fd), &mut chunk) {
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(nix::errno::Errno::EAGAIN) => {}
            Err(e) => panic!("{e}"),
        }
    }
    String::from_utf8(buf)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn plain_shell_handshake_from_the_docs_works() {
    let bus = TempBus::start();
    let script = r#"
        set -eu
        r=$(mktemp -u); mkfifo -m 600 "$r"
        echo "HELLO reply=$r name=alice sub=chat.>" > "$DIR/hello"
        read -r _ id cdir < "$r"; rm -f "$r"
        echo "$id $cdir"
    "#;
    let (status, out, err) = sh(script, &[("DIR", bus.dir.as_os_str())], T);
    assert!(status.success(), "{err}");
    let (id, cdir) = out.trim().split_once(' ').unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    let cdir = Path::new(cdir);
    assert_eq!(cdir, bus.clients_dir().join(id));
    for f in ["send", "recv"] {
        let m = fs::symlink_metadata(cdir.join(f)).unwrap();
        assert!(m.file_type().is_fifo());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
    }
    // sub= was in force before WELCOME.
    let mut p = bus.connect("p", &[]);
    p.publish(&topic("chat.x"), b"hi").unwrap();
    barrier(&mut p);
    let (status, out, _) = sh(
        r#"read -r l < "$C/recv"; echo "$l""#,
        &[("C", cdir.as_os_str())],
        T,
    );
    assert!(status.success());
    assert_eq!(out, "MSG chat.x hi\n");
}

#[test]
fn bus_directory_is_private_and_names_never_become_paths() {
    let bus = TempBus::start();
    assert_eq!(
        fs::metadata(&bus.dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let c = bus.connect("../../../../etc/evil", &[]);
    assert_eq!(c.dir().parent().unwrap(), bus.clients_dir());
    assert!(uuid::Uuid::parse_str(c.dir().file_name().unwrap().to_str().unwrap()).is_ok());
    assert_eq!(bus.client_dirs().len(), 1);
}

#[test]
fn unknown_pid_is_refused_through_the_client_library() {
    let bus = TempBus::start();
    let opts = ConnectOptions {
        pid: Some(i32::MAX),
        ..Default::default()
    };
    match Client::connect(&bus.dir, &opts, T) {
        Err(e @ ClientError::Refused { .. }) => assert_eq!(e.code(), Some(ErrorCode::BadPid)),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got WELCOME"),
    }
}

#[test]
fn bad_hello_fields_are_answered_with_err() {
    let bus = TempBus::start();
    let tmp = tempfile::tempdir().unwrap();
    let fd = reply_reader(&tmp.path().join("r"));
    let r = tmp.path().join("r");
    let r = r.display();
    write_hello(&bus, &format!("HELLO reply={r} subs=a\nHELLO reply={r} sub=a..b\nHELLO reply={r} pid=abc\nHELLO reply={r} pid=2147483647\n"));
    let lines = read_reply_lines(&fd, 4);
    let codes: Vec<&str> = lines.iter().map(|l| l.split(' ').nth(1).unwrap()).collect();
    let mut codes = codes.clone();
    codes.sort();
    assert_eq!(
        codes,
        ["bad-hello", "bad-pattern", "bad-pid", "bad-pid"],
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| l.starts_with("ERR ")));
    assert!(bus.client_dirs().is_empty(), "refusals create nothing");
}

#[test]
fn hello_without_reply_is_logged_and_the_broker_carries_on() {
    let bus = TempBus::start();
    write_hello(&bus, "HELLO name=lost\nGARBAGE\n\n");
    assert!(bus.wait_log("no usable reply="));
    let mut c = bus.connect("after", &[]);
    barrier(&mut c);
}

#[test]
fn reply_that_is_a_symlink_file_or_device_is_never_written() {
    let bus = TempBus::start();
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    fs::write(&target, b"precious").unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let fifo_target = tmp.path().join("fifo");
    let fd = reply_reader(&fifo_target);
    let fifo_link = tmp.path().join("fifolink");
    std::os::unix::fs::symlink(&fifo_target, &fifo_link).unwrap();
    for reply in [&link, &target, &fifo_link, Path::new("/dev/null")] {
        write_hello(&bus, &hello_line(reply, None));
    }
    // The refusals are logged; a later good client is served.
    let mut c = bus.connect("after", &[]);
    barrier(&mut c);
    assert!(bus.wait_log("is a symlink"));
    assert!(bus.wait_log("is not a FIFO"));
    assert_eq!(fs::read(&target).unwrap(), b"precious");
    // Nothing came through the symlink into the FIFO it points at.
    // (With no writer, a read gets EOF; with a writer and no data, EAGAIN.)
    let mut chunk = [0u8; 16];
    let got = nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut chunk);
    assert!(
        matches!(got, Ok(0) | Err(nix::errno::Errno::EAGAIN)),
        "{got:?}"
    );
    assert!(bus.client_dirs().iter().all(|d| d == c.dir()));
}

#[test]
fn reply_nobody_reads_times_out_and_leaves_nothing() {
    let bus = TempBus::start_with(&["--handshake-timeout", "200ms"]);
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path().join("unread");
    nix::unistd::mkfifo(&r, Mode::from_bits_truncate(0o600)).unwrap();
    write_hello(&bus, &hello_line(&r, Some("ghost")));
    assert!(bus.wait_log("nobody opened"));
    assert!(bus.client_dirs().is_empty());
    let mut c = bus.connect("after", &[]);
    barrier(&mut c);
}

#[test]
fn ten_thousand_hellos_in_a_burst_are_all_answered() {
    const REPLIES: usize = 100;
    const EACH: usize = 100;
    let bus = TempBus::start();
    let tmp = tempfile::tempdir().unwrap();
    let fds: Vec<(String, OwnedFd)> = (0..REPLIES)
        .map(|i| {
            let p = tmp.path().join(format!("r{i}"));
            let fd = reply_reader(&p);
            (p.display().to_string(), fd)
        })
        .collect();
    // With pid= (this process), so that past the table's size the broker
    // answers too-many-clients rather than ending pid-less clients to make
    // room (that is tests/orphans.rs).
    let me = std::process::id();
    let mut burst = String::new();
    for _ in 0..EACH {
        for (p, _) in &fds {
            burst.push_str(&hello_line_with(Path::new(p), None, Some(me)));
        }
    }
    // Several writers at once, as in real life. Each line is one write(),
    // under PIPE_BUF, so the kernel keeps lines whole.
    let writers: Vec<_> = burst
        .lines()
        .collect::<Vec<_>>()
        .chunks(2500)
        .map(|chunk| {
            let lines: Vec<String> = chunk.iter().map(|l| format!("{l}\n")).collect();
            let hello = bus.dir.join("hello");
            std::thread::spawn(move || {
                let mut f = fs::OpenOptions::new().write(true).open(hello).unwrap();
                for l in lines {
                    f.write_all(l.as_bytes()).unwrap();
                }
            })
        })
        .collect();
    // Read every reply FIFO as answers arrive, like 100 independent clients.
    let mut pending: Vec<Vec<u8>> = vec![Vec::new(); REPLIES];
    let mut lines = Vec::new();
    let deadline = Instant::now() + T * 3;
    while lines.len() < REPLIES * EACH {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "only {} of {} answered",
            lines.len(),
            REPLIES * EACH
        );
        let mut polls: Vec<_> = fds
            .iter()
            .map(|(_, fd)| nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN))
            .collect();
        let _ = nix::poll::poll(
            &mut polls,
            nix::poll::PollTimeout::try_from(left.as_millis() as i32).unwrap(),
        );
        for (i, (_, fd)) in fds.iter().enumerate() {
            let mut chunk = [0u8; 65536];
            if let Ok(k) = nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(fd), &mut chunk) {
                pending[i].extend_from_slice(&chunk[..k]);
                while let Some(end) = pending[i].iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending[i].drain(..=end).collect();
                    lines.push(String::from_utf8(line).unwrap());
                }
            }
        }
    }
    let mut welcomed = 0;
    for line in &lines {
        match Reply::parse(line.trim_end_matches('\n').as_bytes()) {
            Reply::Welcome { .. } => welcomed += 1,
            r => assert_eq!(r.error_code(), Some(ErrorCode::TooManyClients), "{line}"),
        }
    }
    for w in writers {
        w.join().unwrap();
    }
    assert!(welcomed > 0);
    assert_eq!(bus.client_dirs().len(), welcomed);
    eprintln!("{welcomed} of {} welcomed", REPLIES * EACH);
}
