//! Metrics are not a side door: `--metrics-token-file` guards `/metrics`
//! with a bearer token, `/healthz` stays open, an unsafe token file stops
//! the broker, `fifobus stats` sends the token, and topic and client labels
//! can be turned off. The claims about other users are tested with a real,
//! unprivileged throwaway user.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use common::*;

const TOKEN: &str = "3f2a9c0d5b8e41f7a6c2d9e0b1f4a7c3";

/// A token file in the bus's temporary directory (beside `bus/`), mode `mode`.
fn token_file(bus: &TempBus, name: &str, content: &str, mode: u32) -> PathBuf {
    let p = bus.tmp.path().join(name);
    std::fs::write(&p, content).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// A broker whose `/metrics` requires [`TOKEN`], with one published topic
/// so `/metrics` has a name to give away.
fn guarded_bus(extra: &[&str]) -> (TempBus, PathBuf) {
    let mut bus = TempBus::new(BusOptions::default()).unwrap();
    let token = token_file(&bus, "metrics.token", &format!("{TOKEN}\n"), 0o600);
    let mut args = vec!["--metrics-token-file", token.to_str().unwrap()];
    args.extend_from_slice(extra);
    bus.spawn(&args);
    let mut p = bus.connect("secret-publisher", &[]);
    p.send_raw(&pub_lines([("secret.plans", "x")])).unwrap();
    barrier(&mut p);
    (bus, token)
}

fn addr(bus: &TempBus) -> String {
    fifobus::stats::metrics_url(&bus.dir)
        .unwrap()
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned()
}

struct Answer {
    status: u16,
    challenge: Option<String>,
    body: String,
}

fn get(url: &str, authorization: Option<&str>) -> Answer {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.get(url);
    if let Some(a) = authorization {
        req = req.header("Authorization", a);
    }
    let mut r = req.call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    Answer {
        status: r.status().as_u16(),
        challenge: r
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned()),
        body: r.body_mut().read_to_string().unwrap(),
    }
}

/// Runs `cmd` to completion (bounded by [`T`]); returns (status, stdout, stderr).
fn run(mut cmd: Command) -> (ExitStatus, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = wait_child(&mut child, T).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} did not finish within {T:?}")
    });
    (status, out_t.join().unwrap(), err_t.join().unwrap())
}

fn fifobus(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("--dir")
        .arg(dir)
        .args(args)
        .env_remove("FIFOBUS_METRICS_TOKEN_FILE");
    cmd
}

#[test]
fn metrics_answer_401_without_the_right_token_and_200_with_it() {
    let (bus, _) = guarded_bus(&[]);
    let url = format!("http://{}/metrics", addr(&bus));

    let none = get(&url, None);
    assert_eq!(none.status, 401, "{}", none.body);
    assert_eq!(none.challenge.as_deref(), Some(r#"Bearer realm="fifobus""#));
    assert_eq!(none.body.lines().count(), 1, "{}", none.body);
    assert!(none.body.contains("Authorization: Bearer"), "{}", none.body);
    assert!(!none.body.contains("secret"), "{}", none.body);

    for wrong in [
        format!("Bearer {}", &TOKEN[1..]),
        format!("Bearer {TOKEN}x"),
        format!("Bearer {}", TOKEN.to_uppercase()),
        format!("Basic {TOKEN}"),
        TOKEN.to_owned(),
    ] {
        let a = get(&url, Some(&wrong));
        assert_eq!(a.status, 401, "{wrong}: {}", a.body);
        let challenge = a.challenge.unwrap_or_default();
        assert!(challenge.starts_with("Bearer "), "{challenge}");
        assert!(challenge.contains("invalid_token"), "{challenge}");
        assert_eq!(a.body.lines().count(), 1, "{}", a.body);
        assert!(!a.body.contains("fifobus_"), "{}", a.body);
    }

    let ok = get(&url, Some(&format!("Bearer {TOKEN}")));
    assert_eq!(ok.status, 200);
    for family in [
        r#"fifobus_messages_published_total{topic="secret.plans"} 1"#,
        "fifobus_clients 1",
        "fifobus_handshakes_accepted_total 1",
        "# TYPE fifobus_delivery_latency_seconds histogram",
        "process_open_fds",
    ] {
        assert!(ok.body.contains(family), "{family} missing:\n{}", ok.body);
    }
    // The scheme is case-insensitive (RFC 9110).
    assert_eq!(get(&url, Some(&format!("bearer {TOKEN}"))).status, 200);

    let health = get(&format!("http://{}/healthz", addr(&bus)), None);
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    assert!(
        bus.log_text().contains("refused a /metrics request"),
        "logged"
    );
}

#[test]
fn stats_sends_the_token_and_says_when_one_is_needed() {
    let (bus, token) = guarded_bus(&[]);
    let (status, out, err) = run(fifobus(&bus.dir, &["stats", "--interval", "10ms"]));
    assert!(!status.success());
    assert_eq!(out, "");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("requires a bearer token"), "{err}");
    assert!(err.contains("--metrics-token-file"), "{err}");

    let t = token.to_str().unwrap();
    let (status, out, err) = run(fifobus(
        &bus.dir,
        &["stats", "--interval", "10ms", "--metrics-token-file", t],
    ));
    assert!(status.success(), "{err}");
    assert!(out.lines().any(|l| l.starts_with("secret.plans ")), "{out}");

    let mut by_env = fifobus(&bus.dir, &["stats", "--interval", "10ms"]);
    by_env.env("FIFOBUS_METRICS_TOKEN_FILE", &token);
    let (status, out, err) = run(by_env);
    assert!(status.success(), "{err}");
    assert!(out.contains("secret.plans"), "{out}");

    // A client's copy of the token need not be private: only the broker's must.
    let wrong = token_file(&bus, "wrong.token", "not-the-token\n", 0o644);
    let (status, _, err) = run(fifobus(
        &bus.dir,
        &["stats", "--metrics-token-file", wrong.to_str().unwrap()],
    ));
    assert!(!status.success());
    assert!(err.contains("refused the token"), "{err}");
}

/// The broker is started and must exit at once with `needle` in its log,
/// without having published `hello`.
fn refuses_to_start(bus: &TempBus, args: &[&str], needle: &str) {
    let mut child = bus.spawn_raw(args);
    let status = wait_child(&mut child, T).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the broker started with {args:?}")
    });
    assert!(!status.success());
    let log = bus.log_text();
    assert!(log.contains(needle), "{needle:?} not in:\n{log}");
    assert!(!bus.dir.join("hello").exists(), "it did not serve");
}

#[test]
fn an_unsafe_token_file_stops_the_broker_and_says_what_to_do() {
    let bus = TempBus::new(BusOptions::default()).unwrap();
    for mode in [0o640, 0o604, 0o660, 0o606] {
        let f = token_file(&bus, &format!("t{mode:o}"), TOKEN, mode);
        let f = f.to_str().unwrap();
        refuses_to_start(
            &bus,
            &["--metrics-token-file", f],
            &format!("chmod 600 {f}"),
        );
    }
    let real = token_file(&bus, "real.token", TOKEN, 0o600);
    let link = bus.tmp.path().join("link.token");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let link = link.to_str().unwrap();
    refuses_to_start(
        &bus,
        &["--metrics-token-file", link],
        &format!("{link}: Too many levels of symbolic links"),
    );
    assert!(bus.log_text().contains("it is a symbolic link"));
    let empty = token_file(&bus, "empty.token", "\n", 0o600);
    refuses_to_start(
        &bus,
        &["--metrics-token-file", empty.to_str().unwrap()],
        "is empty",
    );
    let missing = bus.tmp.path().join("missing.token");
    refuses_to_start(
        &bus,
        &["--metrics-token-file", missing.to_str().unwrap()],
        "cannot open the metrics token file",
    );
}

#[test]
fn with_labels_off_metrics_name_no_topic_and_no_client() {
    let bus = TempBus::start_with(&[
        "--metrics-topic-labels",
        "off",
        "--metrics-client-labels",
        "off",
    ]);
    let _sub = bus.connect("secret-subscriber", &["secret.>"]);
    let mut p = bus.connect("secret-publisher", &[]);
    p.send_raw(&pub_lines([("secret.plans", "xy"), ("secret.more", "z")]))
        .unwrap();
    barrier(&mut p);
    let text = get(&fifobus::stats::metrics_url(&bus.dir).unwrap(), None).body;
    assert!(!text.contains("secret"), "{text}");
    for line in [
        r#"fifobus_messages_published_total{topic="_all"} 2"#,
        r#"fifobus_published_bytes_total{topic="_all"} 3"#,
        r#"fifobus_messages_delivered_total{topic="_all"} 2"#,
        r#"fifobus_client_backlog_messages{client="_all"} "#,
        "fifobus_clients 2",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
}

/// `bash` as `user`, speaking HTTP/1.0 to `addr` over /dev/tcp: what any
/// local user can do without a client library. Prints the whole answer.
fn http_as(user: &users::User, addr: &str, path: &str, authorization: Option<&str>) -> String {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut cmd = user.command("bash");
    cmd.arg("-c")
        .arg(
            r#"exec 3<>"/dev/tcp/$HOST/$PORT" || exit 2
               printf 'GET %s HTTP/1.0\r\nHost: %s\r\n' "$REQ_PATH" "$HOST" >&3
               [ -n "$AUTH" ] && printf 'Authorization: %s\r\n' "$AUTH" >&3
               printf '\r\n' >&3
               cat <&3"#,
        )
        .env("HOST", host)
        .env("PORT", port)
        .env("REQ_PATH", path)
        .env("AUTH", authorization.unwrap_or(""));
    let (status, out, err) = run(cmd);
    assert!(status.success(), "request as {} failed: {err}", user.name);
    out
}

/// Another local user can reach loopback, but cannot read the token file and
/// so gets 401 from `/metrics`: the topic names stay between the broker's
/// user and whoever holds the token. (Before `--metrics-token-file`, this
/// user's request got 200 and `secret.plans`.)
#[test]
#[ignore = "needs root: creates throwaway users"]
fn another_local_user_cannot_read_the_token_or_the_metrics() {
    let (bus, token) = guarded_bus(&[]);
    // Let the user reach the token file, so that what stops it is the
    // file's own mode and nothing else.
    std::fs::set_permissions(bus.tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let eve = users::User::create("metrics");

    let mut open = eve.command("bash");
    open.arg("-c")
        .arg(r#"exec 3<"$TOKEN" && echo opened"#)
        .env("TOKEN", &token);
    let (status, out, err) = run(open);
    assert!(!status.success(), "{} read the token: {out}", eve.name);
    assert!(err.contains("Permission denied"), "EACCES expected: {err}");

    let a = addr(&bus);
    for auth in [
        None,
        Some("Bearer guess"),
        Some(&*format!("Bearer {}", &TOKEN[..31])),
    ] {
        let answer = http_as(&eve, &a, "/metrics", auth);
        assert!(answer.starts_with("HTTP/1.0 401"), "{auth:?}:\n{answer}");
        assert!(answer
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"));
        assert!(!answer.contains("secret"), "{answer}");
        assert!(!answer.contains("fifobus_"), "{answer}");
    }
    // The same request does get through to the endpoint: /healthz answers,
    // and with the token (which eve cannot read) /metrics would.
    let health = http_as(&eve, &a, "/healthz", None);
    assert!(
        health.starts_with("HTTP/1.0 200") && health.ends_with("\r\n\r\nok\n"),
        "{health}"
    );
    let holder = http_as(&eve, &a, "/metrics", Some(&format!("Bearer {TOKEN}")));
    assert!(holder.starts_with("HTTP/1.0 200"), "{holder}");
    assert!(holder.contains(r#"topic="secret.plans""#), "{holder}");
}

/// A token file that another user owns may hold a token that user chose:
/// the broker refuses it even when its mode is 0600.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn a_token_file_owned_by_another_user_stops_the_broker() {
    let bus = TempBus::new(BusOptions::default()).unwrap();
    let mallory = users::User::create("tokenown");
    let f = token_file(&bus, "theirs.token", TOKEN, 0o600);
    nix::unistd::chown(
        &f,
        Some(nix::unistd::Uid::from_raw(mallory.uid)),
        Some(nix::unistd::Gid::from_raw(mallory.gid)),
    )
    .unwrap();
    refuses_to_start(
        &bus,
        &["--metrics-token-file", f.to_str().unwrap()],
        &format!("owned by uid {}", mallory.uid),
    );
}
