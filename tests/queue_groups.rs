//! Queue groups (`SUB <pattern> queue=<name>`, `fifobus sub --queue`)
//! through the real broker and real FIFOs: each message goes to one member
//! of each group, plain subscribers still get all, a busy member is passed
//! over, members that leave are replaced by the others at once.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use common::*;
use fifobus::client::Client;
use fifobus::protocol::Reply;

fn scrape(bus: &TempBus) -> Option<fifobus::stats::Snapshot> {
    let url = fifobus::stats::metrics_url(&bus.dir).ok()?;
    fifobus::stats::scrape(&url, None).ok()
}

/// Waits until the broker holds `n` subscriptions (plain and queue), by
/// its `/metrics`.
fn wait_subscriptions(bus: &TempBus, n: usize) {
    let held = || scrape(bus).map(|s| s.subscriptions as usize);
    assert!(
        wait_for(&bus.clients_dir(), T, || held() == Some(n)),
        "the broker holds {:?} subscriptions, not {n}",
        held()
    );
}

/// A client that joined queue group `group` with `pattern`.
fn member(bus: &TempBus, name: &str, pattern: &str, group: &str) -> Client {
    let mut c = bus.connect(name, &[]);
    c.send_raw(format!("SUB {pattern} queue={group}\n").as_bytes())
        .unwrap();
    assert_eq!(barrier(&mut c), Vec::<String>::new(), "{name}: SUB refused");
    c
}

/// The payloads of the `MSG` lines; panics on anything but `MSG`.
fn payloads(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| match Reply::parse(l.as_bytes()) {
            Reply::Msg { payload, .. } => String::from_utf8_lossy(payload).into_owned(),
            _ => panic!("not a message: {l:?} in {lines:?}"),
        })
        .collect()
}

fn publish_numbered(p: &mut Client, topic: &str, n: usize, pad: usize) {
    let msgs: Vec<(String, String)> = (0..n)
        .map(|i| (topic.to_owned(), format!("{i:05}{}", "x".repeat(pad))))
        .collect();
    p.send_raw(&pub_lines(msgs)).unwrap();
    assert_eq!(barrier(p), Vec::<String>::new());
}

#[test]
fn each_message_goes_to_one_member_and_every_plain_subscriber_gets_all() {
    let bus = TempBus::start();
    let mut w1 = member(&bus, "w1", "jobs.>", "workers");
    let mut w2 = member(&bus, "w2", "jobs.>", "workers");
    // Same name, other pattern: another group, which gets its own copy.
    let mut solo = member(&bus, "solo", "jobs.*", "workers");
    let mut plain = bus.connect("plain", &["jobs.>"]);
    let mut p = bus.connect("pub", &[]);
    publish_numbered(&mut p, "jobs.a", 10, 0);
    let (a, b) = (payloads(&barrier(&mut w1)), payloads(&barrier(&mut w2)));
    assert_eq!(a.len(), 5, "round robin: {a:?} / {b:?}");
    assert_eq!(b.len(), 5, "round robin: {a:?} / {b:?}");
    let mut all: Vec<String> = a.iter().chain(&b).cloned().collect();
    all.sort();
    let want: Vec<String> = (0..10).map(|i| format!("{i:05}")).collect();
    assert_eq!(all, want, "each exactly once");
    assert_eq!(payloads(&barrier(&mut solo)), want);
    assert_eq!(payloads(&barrier(&mut plain)), want);
}

#[test]
fn a_busy_member_gets_no_more_than_its_share() {
    // Small backlogs, so that a member that does not read is full soon.
    let bus = TempBus::start_with(&["--backlog-bytes", "16KiB"]);
    let busy = member(&bus, "busy", "jobs", "w");
    let mut idle = member(&bus, "idle", "jobs", "w");
    idle.subscribe(&pattern("ctl")).unwrap();
    barrier(&mut idle);
    // The idle member reads all the time, in a thread, until the end marker.
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let got = read_until(&mut idle, "MSG ctl end");
        tx.send(()).unwrap();
        (got, idle)
    });
    const N: usize = 400;
    const CHUNK: usize = 8;
    let mut p = bus.connect("pub", &[]);
    // 1 KiB each: the busy member's pipe and backlog hold well under N / 2.
    // In chunks smaller than a backlog, each sent once the idle member's
    // backlog is empty again, so that it never overflows: any loss would
    // be the broker's choosing a full member.
    let idle_backlog =
        || scrape(&bus).and_then(|s| s.client_backlog.get("idle").map(|b| b.0 as usize));
    for c in 0..N / CHUNK {
        let msgs: Vec<(&str, String)> = (c * CHUNK..(c + 1) * CHUNK)
            .map(|i| ("jobs", format!("{i:05}{}", "x".repeat(1000))))
            .collect();
        p.send_raw(&pub_lines(msgs)).unwrap();
        assert_eq!(barrier(&mut p), Vec::<String>::new());
        assert!(
            wait_for(&bus.clients_dir(), T, || idle_backlog() == Some(0)),
            "the idle member's backlog stays at {:?}",
            idle_backlog()
        );
    }
    p.publish(&topic("ctl"), b"end").unwrap();
    barrier(&mut p);
    rx.recv_timeout(T)
        .expect("the idle member got the end marker");
    let (idle_lines, _idle) = reader.join().unwrap();
    let mut busy = busy;
    let busy_lines = barrier(&mut busy);
    let (i, b) = (payloads(&idle_lines), payloads(&busy_lines));
    assert!(
        !b.is_empty(),
        "the busy member got its turns before it was full"
    );
    assert!(
        b.len() < N / 2,
        "the busy member got {} of {N}: more than its share",
        b.len()
    );
    let mut all: Vec<&str> = i.iter().chain(&b).map(|s| &s[..5]).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), N, "every job delivered once, none dropped");
    assert_eq!(i.len() + b.len(), N);
}

#[test]
fn when_members_leave_the_others_take_over() {
    let bus = TempBus::start();
    let w1 = member(&bus, "w1", "t", "g");
    let mut w2 = member(&bus, "w2", "t", "g");
    let mut w3 = member(&bus, "w3", "t", "g");
    assert!(w1.bye(T).unwrap().is_empty());
    w2.send_raw(b"UNSUB t queue=g\n").unwrap();
    assert_eq!(barrier(&mut w2), Vec::<String>::new());
    let mut p = bus.connect("pub", &[]);
    publish_numbered(&mut p, "t", 6, 0);
    assert_eq!(barrier(&mut w2), Vec::<String>::new());
    assert_eq!(payloads(&barrier(&mut w3)).len(), 6);
    // A member whose process dies is removed, and the last one takes all.
    let mut w4 = member(&bus, "w4", "t", "g");
    drop(w3);
    publish_numbered(&mut p, "t", 4, 0);
    // w3 never read; what was queued for it may be lost with it, but
    // nothing sent after it left goes to it: w4 gets at least half.
    let got = payloads(&barrier(&mut w4));
    assert!(got.len() >= 2, "{got:?}");
}

#[test]
fn bad_queue_options_are_refused_with_a_clear_error() {
    let bus = TempBus::start();
    let mut c = bus.connect("c", &[]);
    c.send_raw(b"SUB t queue=\nSUB t queue=a/b\nSUB t lossy\nSUB t queue=a queue=b\n")
        .unwrap();
    let got = barrier(&mut c);
    assert_eq!(got.len(), 4, "{got:?}");
    for l in &got {
        assert!(l.starts_with("ERR bad-syntax "), "{got:?}");
    }
    assert!(got[1].contains("'/' is not allowed"), "{got:?}");
    wait_subscriptions(&bus, 0);
}

/// `fifobus --dir DIR sub ...`, stdout piped, in a process group of its own.
fn sub_cmd(dir: &Path, args: &[&str]) -> Child {
    use std::os::unix::process::CommandExt;
    Command::new(bin())
        .arg("--dir")
        .arg(dir)
        .arg("sub")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap()
}

#[test]
fn cli_sub_queue_members_share_the_messages() {
    let bus = TempBus::start();
    let mut kids: Vec<Child> = (0..2)
        .map(|_| sub_cmd(&bus.dir, &["t", "--queue", "pool", "-n", "3"]))
        .collect();
    wait_subscriptions(&bus, 2);
    let mut p = bus.connect("pub", &[]);
    publish_numbered(&mut p, "t", 6, 0);
    let mut all = BTreeSet::new();
    for k in &mut kids {
        let status = wait_child(k, T).expect("sub -n 3 exits");
        let out = std::io::read_to_string(k.stdout.take().unwrap()).unwrap();
        let err = std::io::read_to_string(k.stderr.take().unwrap()).unwrap();
        assert!(status.success(), "{status:?}: {err}");
        assert_eq!(out.lines().count(), 3, "its share, round robin: {out:?}");
        all.extend(out.lines().map(str::to_owned));
    }
    assert_eq!(all.len(), 6, "each once: {all:?}");
}

#[test]
fn cli_sub_queue_refuses_a_bad_name_before_connecting() {
    let tmp = temp_root();
    let mut k = sub_cmd(tmp.path(), &["t", "--queue", "a b"]);
    let status = wait_child(&mut k, T).unwrap();
    let err = std::io::read_to_string(k.stderr.take().unwrap()).unwrap();
    // A usage error, found before any handshake: there is no bus here.
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("--queue: queue name 'a b'"), "{err}");
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

/// The worker pool example: shell loops sharing a queue group do every job
/// once between them.
#[test]
fn worker_pool_example_does_each_job_once() {
    use std::os::unix::process::CommandExt;
    let bus = TempBus::start();
    let mut results = bus.connect("results", &["jobs.done"]);
    let bin_dir = bin().parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut pool = Command::new("bash")
        .arg(example("worker_pool.sh"))
        .arg("3")
        .env("FIFOBUS_DIR", &bus.dir)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = nix::unistd::Pid::from_raw(pool.id() as i32);
    // Three workers, and the results client.
    wait_subscriptions(&bus, 4);
    let mut p = bus.connect("pub", &[]);
    const N: usize = 12;
    let jobs: Vec<(&str, String)> = (0..N).map(|i| ("jobs", format!("job-{i}"))).collect();
    p.send_raw(&pub_lines(jobs)).unwrap();
    barrier(&mut p);
    let mut done = Vec::new();
    while done.len() < N {
        let line = results
            .read_line(Some(T))
            .unwrap()
            .expect("the broker is running");
        done.push(String::from_utf8(line).unwrap());
    }
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
    let status = wait_child(&mut pool, T).expect("the pool ends on SIGTERM");
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    let err = std::io::read_to_string(pool.stderr.take().unwrap()).unwrap();
    let mut jobs_done: Vec<String> = Vec::new();
    let mut workers = BTreeSet::new();
    for l in &done {
        // MSG jobs.done worker-<i> JOB-<n>
        let words: Vec<&str> = l.split(' ').collect();
        assert_eq!(words.len(), 4, "{l:?} ({status:?}: {err})");
        workers.insert(words[2].to_owned());
        jobs_done.push(words[3].to_owned());
    }
    jobs_done.sort();
    let mut want: Vec<String> = (0..N).map(|i| format!("JOB-{i}")).collect();
    want.sort();
    assert_eq!(jobs_done, want, "each job once: {done:?}");
    assert_eq!(workers.len(), 3, "the work was shared: {done:?}");
}
