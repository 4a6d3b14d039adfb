//! Issue 8, the broker's side of the filesystem and the handshake: attacks
//! by real, unprivileged users on the bus directory, `hello`, `reply=` and
//! `pid=`, and the shared bus they may all use.
//!
//! Tests that create users need root (CI runs as root) and are ignored in a
//! plain `cargo test`; run them with `-- --include-ignored`.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;

use common::users::User;
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{chown, Gid, Pid, Uid};

/// Runs `bash -c script` as `user` with `args` as `$1...`, bounded by [`T`].
fn run_as(user: &User, script: &str, args: &[&OsStr]) -> Output {
    let child = user
        .command("bash")
        .arg("-c")
        .arg(script)
        .arg("bash")
        .args(args)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(T) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = rx.recv();
            panic!("`{script}` as {} did not finish within {T:?}", user.name)
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn give(path: &Path, user: &User, mode: u32) {
    chown(
        path,
        Some(Uid::from_raw(user.uid)),
        Some(Gid::from_raw(user.gid)),
    )
    .unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Starts a broker on `bus` that must refuse to start; returns its log.
fn refused(bus: &TempBus, args: &[&str]) -> String {
    let mut child = bus.spawn_raw(args);
    let status = wait_child(&mut child, T).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the broker kept running; log:\n{}", bus.log_text())
    });
    assert!(
        !status.success(),
        "the broker started; log:\n{}",
        bus.log_text()
    );
    bus.log_text()
}

/// A root-owned file outside the bus, which no broker may touch.
struct Victim {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Victim {
    fn new() -> Victim {
        let dir = temp_root();
        let path = dir.path().join("some.conf");
        fs::write(&path, "precious\n").unwrap();
        Victim { _dir: dir, path }
    }

    fn assert_intact(&self) {
        assert_eq!(fs::read_to_string(&self.path).unwrap(), "precious\n");
    }
}

/// (a) The `/tmp/fifobus-0` attack: another user prepares the directory,
/// with `broker.pid` a symlink to a file of root's and a world-writable
/// `clients/`. Root's broker refuses it, says why, and touches nothing.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn root_broker_refuses_a_directory_another_user_prepared() {
    let mallory = User::create("squat");
    let victim = Victim::new();
    let bus = TempBus::new(BusOptions::default()).unwrap();
    // The parent is mallory's to write in, as /tmp is everybody's.
    give(bus.tmp.path(), &mallory, 0o755);
    let out = run_as(
        &mallory,
        r#"set -e; mkdir -m 755 "$1"; ln -s "$2" "$1/broker.pid"; mkdir -m 777 "$1/clients""#,
        &[bus.dir.as_os_str(), victim.path.as_os_str()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    let log = refused(&bus, &[]);
    victim.assert_intact();
    assert!(
        log.contains(&format!(
            "bus directory {} belongs to uid {}",
            bus.dir.display(),
            mallory.uid
        )) && log.contains("remove it or choose another --dir"),
        "{log}"
    );
    assert!(
        bus.client_dirs().is_empty() && !bus.dir.join("hello").exists(),
        "nothing is created in it"
    );
}

/// (b) Things planted in a directory the broker adopts (its own, so the
/// directory check passes) are refused with an error naming them, and
/// nothing is written through a link.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn planted_entries_are_refused_and_never_followed() {
    let mallory = User::create("plant");
    let victim = Victim::new();
    let elsewhere = temp_root();
    let lchown_to_mallory = |p: &Path| {
        nix::unistd::fchownat(
            None,
            p,
            Some(Uid::from_raw(mallory.uid)),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap()
    };
    type Plant<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, &str, Plant)> = vec![
        (
            "broker.pid",
            "is a symlink",
            Box::new(|d: &Path| {
                std::os::unix::fs::symlink(&victim.path, d.join("broker.pid")).unwrap()
            }),
        ),
        (
            "metrics.addr",
            "is a symlink",
            Box::new(|d: &Path| {
                std::os::unix::fs::symlink(&victim.path, d.join("metrics.addr")).unwrap()
            }),
        ),
        (
            "hello",
            "is a regular file",
            Box::new(|d: &Path| fs::write(d.join("hello"), "x").unwrap()),
        ),
        (
            "hello",
            &*Box::leak(format!("is a FIFO owned by uid {}", mallory.uid).into_boxed_str()),
            Box::new(|d: &Path| {
                nix::unistd::mkfifo(
                    &d.join("hello"),
                    nix::sys::stat::Mode::from_bits_truncate(0o622),
                )
                .unwrap();
                lchown_to_mallory(&d.join("hello"));
            }),
        ),
        (
            "clients",
            "is a symlink",
            Box::new(|d: &Path| {
                std::os::unix::fs::symlink(elsewhere.path(), d.join("clients")).unwrap()
            }),
        ),
        (
            "clients",
            &*Box::leak(format!("is a directory owned by uid {}", mallory.uid).into_boxed_str()),
            Box::new(|d: &Path| {
                fs::create_dir(d.join("clients")).unwrap();
                lchown_to_mallory(&d.join("clients"));
            }),
        ),
        (
            "clients",
            "is a directory owned by uid 0 (mode 0777)",
            Box::new(|d: &Path| {
                fs::create_dir(d.join("clients")).unwrap();
                fs::set_permissions(d.join("clients"), fs::Permissions::from_mode(0o777)).unwrap();
            }),
        ),
    ];
    for (name, what, plant) in &cases {
        let bus = TempBus::new(BusOptions::default()).unwrap();
        fs::create_dir(&bus.dir).unwrap();
        plant(&bus.dir);
        let log = refused(&bus, &[]);
        let path = bus.dir.join(name);
        assert!(
            log.contains(&format!("{} {what}", path.display())) && log.contains("remove it"),
            "{name}: {log}"
        );
        victim.assert_intact();
        assert_eq!(
            fs::read_dir(elsewhere.path()).unwrap().count(),
            0,
            "{name}: nothing made through clients/"
        );
    }

    // A symlink named like a client directory, and a client directory whose
    // `send` is a symlink: the stale cleanup follows neither.
    let target = elsewhere.path().join("target");
    fs::create_dir(&target).unwrap();
    for f in ["send", "recv"] {
        nix::unistd::mkfifo(
            &target.join(f),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
    }
    let mut bus = TempBus::new(BusOptions::default()).unwrap();
    let clients = bus.dir.join("clients");
    fs::create_dir_all(&clients).unwrap();
    fs::set_permissions(&bus.dir, fs::Permissions::from_mode(0o700)).unwrap();
    let link = clients.join(uuid_like(1));
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let half = clients.join(uuid_like(2));
    fs::create_dir(&half).unwrap();
    std::os::unix::fs::symlink(target.join("send"), half.join("send")).unwrap();
    bus.spawn(&[]);
    for f in ["send", "recv"] {
        assert!(target.join(f).exists(), "{f} behind the links is untouched");
    }
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(
        bus.log_text().contains(&link.display().to_string()),
        "kept and reported"
    );
}

fn uuid_like(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// (c) A directory, or a `--mode`, that lets group or others write is
/// refused without `--shared`: they could replace `hello`.
#[test]
fn group_or_other_writable_directory_is_refused() {
    for mode in [0o777, 0o770] {
        let bus = TempBus::new(BusOptions::default()).unwrap();
        fs::create_dir(&bus.dir).unwrap();
        fs::set_permissions(&bus.dir, fs::Permissions::from_mode(mode)).unwrap();
        let log = refused(&bus, &[]);
        assert!(
            log.contains(&format!(
                "bus directory {} is writable by others (mode {mode:04o})",
                bus.dir.display()
            )),
            "{log}"
        );
        assert!(!bus.dir.join("hello").exists());
    }
    for mode in ["777", "770", "722"] {
        let bus = TempBus::new(BusOptions::default()).unwrap();
        let log = refused(&bus, &["--mode", mode]);
        assert!(
            log.contains(&format!("--mode {mode} lets group or others write")),
            "{log}"
        );
        assert!(!bus.dir.exists(), "--mode {mode}: nothing created");
    }
    // Readable is fine.
    let mut bus = TempBus::new(BusOptions::default()).unwrap();
    bus.spawn(&["--mode", "755"]);
    assert_eq!(fs::metadata(&bus.dir).unwrap().mode() & 0o7777, 0o755);
}

fn write_hello(dir: &Path, line: &str) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(dir.join("hello"))
        .unwrap();
    f.write_all(line.as_bytes()).unwrap();
}

/// (d) `reply=` naming the broker's own FIFOs (`hello`, another client's
/// `recv`, even through a hard link outside the bus) is refused without an
/// answer: no phantom client, and nothing injected into the other stream.
#[test]
fn reply_naming_a_broker_fifo_is_refused_in_silence() {
    let bus = TempBus::start();
    let mut victim = bus.connect("victim", &["t.>"]);
    let outside = bus.tmp.path().join("elsewhere");
    fs::create_dir(&outside).unwrap();
    let linked = outside.join("recv");
    fs::hard_link(victim.dir().join("recv"), &linked).unwrap();
    // A FIFO in the bus directory that the broker does not hold, read by
    // someone: refused too (as are a client's FIFOs before it is registered).
    let stray = bus.dir.join("stray");
    nix::unistd::mkfifo(&stray, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let _stray_reader = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&stray)
        .unwrap();
    let replies = [
        stray.clone(),
        bus.dir.join("hello"),
        victim.dir().join("recv"),
        victim.dir().join("send"),
        linked.clone(),
    ];
    for (i, r) in replies.iter().enumerate() {
        write_hello(&bus.dir, &hello_line(r, Some(&format!("phantom{i}"))));
    }
    // Each refusal is logged; the old code logged a join instead.
    let settled = wait_for(&bus.log, T, || {
        let log = bus.log_text();
        log.matches("refused a HELLO without answering it").count()
            + log.matches("client joined").count()
            > replies.len()
    });
    assert!(settled, "log:\n{}", bus.log_text());
    let before_pong = barrier(&mut victim);
    assert!(before_pong.is_empty(), "injected: {before_pong:?}");
    assert_eq!(
        bus.client_dirs(),
        vec![victim.dir().to_owned()],
        "no phantom client"
    );
    let log = bus.log_text();
    assert!(
        log.contains(&format!("{} is inside the bus directory", stray.display())),
        "{log}"
    );
    for r in &replies[1..] {
        assert!(
            log.contains(&format!(
                "{} is a FIFO the broker itself holds",
                r.display()
            )),
            "{log}"
        );
    }
    // The broker still serves, and the victim still works.
    let mut other = bus.connect("other", &[]);
    other.publish(&topic("t.x"), b"hi").unwrap();
    assert_eq!(read_until(&mut victim, "MSG t.x hi"), Vec::<String>::new());
}

/// A broker run by `user` on `<tmp>/bus`, stopped and reaped on drop.
struct UserBroker {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

impl UserBroker {
    fn start(user: &User, tmp: &Path, args: &[&str]) -> UserBroker {
        give(tmp, user, 0o755);
        let dir = tmp.join("bus");
        let log = tmp.join("broker.log");
        let child = user
            .command(bin())
            .arg("serve")
            .arg("--dir")
            .arg(&dir)
            .args(["--metrics-addr", "off"])
            .args(args)
            .env("RUST_LOG", "debug")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut b = UserBroker { child, dir, log };
        let hello = b.dir.join("hello");
        let up = wait_for(&hello, T, || hello.exists());
        assert!(
            up && b.child.try_wait().unwrap().is_none(),
            "{}",
            b.log_text()
        );
        b
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for UserBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The documented shell handshake, as `user`: prints the first reply line.
/// `@SELF@` in the extra fields is the shell's own pid.
const HANDSHAKE: &str = r#"
    set -eu
    d=$(mktemp -d); r=$d/r; mkfifo -m 600 "$r"
    extra=${3//@SELF@/$$}
    echo "HELLO reply=$r name=$2 $extra" > "$1/hello"
    read -r line < "$r"; rm -rf "$d"
    echo "$line"
"#;

fn handshake_as(user: &User, dir: &Path, name: &str, extra: &str) -> String {
    let out = run_as(
        user,
        HANDSHAKE,
        &[dir.as_os_str(), OsStr::new(name), OsStr::new(extra)],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

/// (e) `pid=` must name a process of the client's own user: pid 1 and
/// another user's process are refused with `ERR bad-pid`; its own is fine.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn pid_of_another_user_is_refused() {
    let alice = User::create("pida");
    let bob = User::create("pidb");
    let tmp = temp_root();
    let broker = UserBroker::start(&alice, tmp.path(), &[]);
    let mut bobs = bob
        .command("sleep")
        .arg("60")
        .current_dir("/")
        .spawn()
        .unwrap();
    for pid in [1, bobs.id()] {
        let line = handshake_as(&alice, &broker.dir, "a", &format!("pid={pid}"));
        assert!(
            line.starts_with("ERR bad-pid")
                && line.contains(&format!("process {pid} belongs to uid")),
            "pid={pid}: {line}"
        );
    }
    let _ = bobs.kill();
    let _ = bobs.wait();
    // The handshake's own shell is alice's.
    let line = handshake_as(&alice, &broker.dir, "a", "pid=@SELF@");
    assert!(
        line.starts_with("WELCOME "),
        "{line}\n{}",
        broker.log_text()
    );
}

/// (f) `mv -f x hello` is noticed: the broker puts its own `hello` back,
/// logs what it found, a real client connects, and the impostor FIFO
/// reads nothing.
#[test]
fn hello_replaced_by_the_owner_is_put_back() {
    let bus = TempBus::start();
    let victim = Victim::new();
    type Make<'a> = &'a dyn Fn(&Path);
    let kinds: [(&str, Make); 3] = [
        ("a FIFO owned by uid", &|p: &Path| {
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap()
        }),
        ("a regular file owned by uid", &|p: &Path| {
            fs::write(p, "x").unwrap()
        }),
        ("a symlink owned by uid", &|p: &Path| {
            std::os::unix::fs::symlink(&victim.path, p).unwrap()
        }),
    ];
    let hello = bus.dir.join("hello");
    for (i, (what, make)) in kinds.iter().enumerate() {
        let x = bus.dir.join(format!("x{i}"));
        make(&x);
        let impostor = fs::symlink_metadata(&x).unwrap().ino();
        let reader = fs::metadata(&x).unwrap().file_type().is_fifo().then(|| {
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&x)
                .unwrap()
        });
        let out = Command::new("mv")
            .arg("-f")
            .arg(&x)
            .arg(&hello)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let back = wait_for(&hello, T, || {
            fs::symlink_metadata(&hello)
                .is_ok_and(|m| m.ino() != impostor && m.file_type().is_fifo())
        });
        assert!(back, "hello was not put back; log:\n{}", bus.log_text());
        assert!(bus.wait_log(&format!("{} was replaced by {what}", hello.display())));
        let mut c = bus.connect(&format!("real{i}"), &[]);
        assert!(barrier(&mut c).is_empty());
        if let Some(mut r) = reader {
            let mut got = Vec::new();
            match r.read_to_end(&mut got) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            assert!(got.is_empty(), "the impostor read {:?}", text(&got));
        }
        victim.assert_intact();
    }
}

use std::os::unix::fs::FileTypeExt;

/// (f, g) A shared bus: three users at once. Each one's HELLO works, its
/// client directory and FIFOs are its own (0700/0600), no other user can
/// open them, `clients/` cannot be listed, and nobody but root can replace
/// or remove `hello`, even in a sticky world-writable directory.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn shared_bus_with_three_users() {
    let users = [
        User::create("sha"),
        User::create("shb"),
        User::create("shc"),
    ];
    let mut bus = TempBus::new(BusOptions::default()).unwrap();
    fs::set_permissions(bus.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    bus.spawn(&["--shared"]);
    let meta = |p: &Path| fs::symlink_metadata(p).unwrap();
    assert_eq!(meta(&bus.dir).mode() & 0o7777, 0o755);
    assert_eq!(meta(&bus.dir.join("hello")).mode() & 0o7777, 0o622);
    assert_eq!(meta(&bus.clients_dir()).mode() & 0o7777, 0o711);

    // Each user: HELLO, then PING/PONG through its own FIFOs.
    let script = r#"
        set -eu
        d=$(mktemp -d); r=$d/r; mkfifo -m 600 "$r"
        echo "HELLO reply=$r name=$2" > "$1/hello"
        read -r w id cdir < "$r"; rm -rf "$d"
        [ "$w" = WELCOME ] || { echo "got: $w $id $cdir" >&2; exit 1; }
        exec 4<> "$cdir/recv"
        echo "PING p" > "$cdir/send"
        read -r pong <&4
        echo "$cdir $pong"
    "#;
    let mut dirs = Vec::new();
    for u in &users {
        let out = run_as(u, script, &[bus.dir.as_os_str(), OsStr::new(&u.name)]);
        assert!(
            out.status.success(),
            "{}\n{}",
            text(&out.stderr),
            bus.log_text()
        );
        let stdout = text(&out.stdout);
        let (cdir, pong) = stdout.trim().split_once(' ').unwrap();
        assert_eq!(pong, "PONG p");
        let cdir = PathBuf::from(cdir);
        assert_eq!(
            (meta(&cdir).uid(), meta(&cdir).mode() & 0o7777),
            (u.uid, 0o700)
        );
        for f in ["send", "recv"] {
            let m = meta(&cdir.join(f));
            assert_eq!((m.uid(), m.mode() & 0o7777), (u.uid, 0o600), "{f}");
        }
        dirs.push(cdir);
    }
    for (i, u) in users.iter().enumerate() {
        let out = run_as(u, r#"ls "$1""#, &[bus.clients_dir().as_os_str()]);
        assert!(
            !out.status.success() && text(&out.stderr).contains("Permission denied"),
            "{} listed clients/: {}",
            u.name,
            text(&out.stdout)
        );
        for (j, d) in dirs.iter().enumerate().filter(|(j, _)| *j != i) {
            for f in ["recv", "send"] {
                let out = run_as(u, r#"exec 3<> "$1""#, &[d.join(f).as_os_str()]);
                assert!(
                    !out.status.success() && text(&out.stderr).contains("Permission denied"),
                    "{} opened client {j}'s {f}",
                    u.name
                );
            }
        }
        // Nor can anyone replace or remove hello.
        let x = bus.tmp.path().join(format!("x{i}"));
        let out = run_as(
            u,
            r#"mv -f "$1" "$2/hello" || rm -f "$2/hello""#,
            &[x.as_os_str(), bus.dir.as_os_str()],
        );
        assert!(!out.status.success());
    }
    assert!(bus.dir.join("hello").exists());
    drop(bus);

    // A sticky, world-writable directory is adopted with --shared: users
    // may create names in it, but not rename over or remove the broker's.
    let mut bus = TempBus::new(BusOptions::default()).unwrap();
    fs::set_permissions(bus.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir(&bus.dir).unwrap();
    fs::set_permissions(&bus.dir, fs::Permissions::from_mode(0o1777)).unwrap();
    let log = refused(&bus, &[]);
    assert!(log.contains("writable by others (mode 1777)"), "{log}");
    bus.spawn(&["--shared"]);
    let hello = bus.dir.join("hello");
    let ours = meta(&hello).ino();
    let out = run_as(
        &users[0],
        r#"mkfifo "$1/x" && mv -f "$1/x" "$1/hello""#,
        &[bus.dir.as_os_str()],
    );
    assert!(!out.status.success(), "a user renamed over hello");
    let out = run_as(&users[0], r#"rm -f "$1/hello""#, &[bus.dir.as_os_str()]);
    assert!(!out.status.success(), "a user removed hello");
    assert_eq!(meta(&hello).ino(), ours);
    let line = handshake_as(&users[1], &bus.dir, "b", "");
    assert!(line.starts_with("WELCOME "), "{line}");
}

/// `--shared` without root is refused: it could not give client
/// directories to their users.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn shared_needs_root() {
    let alice = User::create("shnr");
    let tmp = temp_root();
    give(tmp.path(), &alice, 0o755);
    let log = tmp.path().join("log");
    let mut child = alice
        .command(bin())
        .args(["serve", "--shared", "--metrics-addr", "off", "--dir"])
        .arg(tmp.path().join("bus"))
        .current_dir("/")
        .stdin(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = wait_child(&mut child, T).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("--shared started as a user")
    });
    let err = fs::read_to_string(&log).unwrap();
    assert!(
        !status.success() && err.contains("--shared needs root"),
        "{err}"
    );
}
