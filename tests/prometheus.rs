//! The operator's view, checked with the real tools: promtool on deploy/,
//! promtool on a live /metrics, and a real Prometheus scraping a broker
//! under load, through which every dashboard query and every alert rule is
//! evaluated.
//!
//! These need Debian's `prometheus` package (promtool and the server), so
//! they are `#[ignore]`d: a plain `cargo test` lists them as ignored, and
//! `cargo test -- --include-ignored` (what CI runs, after installing the
//! package) runs them, failing with a clear message if a tool is missing.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use fifobus::protocol::encode_pub;

fn find(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The path of `tool` (promtool or prometheus). These tests only run when
/// asked for (`--include-ignored`), so a missing tool is a failure.
fn tool(tool: &str) -> PathBuf {
    find(tool).unwrap_or_else(|| {
        panic!("{tool} is not on PATH; this test needs Debian's prometheus package: apt-get install prometheus")
    })
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn promtool(promtool: &Path, args: &[&str], stdin: Option<&[u8]>) -> (bool, String) {
    let mut child = Command::new(promtool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(data) = stdin {
        input.write_all(data).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn http_get(url: &str) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    agent
        .get(url)
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .map_err(|e| e.to_string())
}

fn metrics_url(bus: &TempBus) -> String {
    fifobus::stats::metrics_url(&bus.dir).unwrap()
}

/// Traffic that makes every series exist: deliveries (latency), drops (a
/// stuck subscriber with a tiny backlog), a protocol error, a rejected HELLO.
fn start_load(bus: &TempBus) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let mut reader = bus.connect("reader", &["load.>"]);
    let stuck = bus.connect("stuck", &["load.>"]);
    let mut p = bus.connect("publisher", &[]);
    let hello = bus.dir.join("hello");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let worker = std::thread::spawn(move || {
        let _keep = stuck;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut i = 0u64;
        while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
            let mut batch = Vec::new();
            for _ in 0..200 {
                let topic = topic(&format!("load.{}", ["a", "b", "c"][(i % 3) as usize]));
                encode_pub(&mut batch, &topic, i.to_string().as_bytes()).unwrap();
                i += 1;
            }
            // A bad line and a refused HELLO now and then, so their counters
            // keep increasing while Prometheus watches.
            if i % 2000 == 0 {
                batch.extend_from_slice(b"NOT-A-COMMAND\n");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&hello)
                    .and_then(|mut h| h.write_all(b"HELLO name=no-reply\n"))
                    .unwrap();
            }
            p.send_raw(&batch).unwrap();
            barrier(&mut p);
            // The reader keeps up, so its deliveries feed the latency histogram.
            let _ = barrier(&mut reader);
            // Pace the load: this is a traffic generator, not a benchmark.
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    (stop, worker)
}

#[test]
#[ignore = "needs promtool: apt-get install prometheus, then cargo test -- --include-ignored"]
fn deploy_config_and_alert_rules_pass_promtool() {
    let promtool_bin = tool("promtool");
    let config = repo("deploy/prometheus/prometheus.yml");
    let rules = repo("deploy/prometheus/alerts.yml");
    let tests = repo("deploy/prometheus/alerts.test.yml");
    for args in [
        vec!["check", "config", config.to_str().unwrap()],
        vec!["check", "rules", rules.to_str().unwrap()],
        vec!["test", "rules", tests.to_str().unwrap()],
    ] {
        let (ok, out) = promtool(&promtool_bin, &args, None);
        assert!(ok, "promtool {args:?}:\n{out}");
    }
}

#[test]
#[ignore = "needs promtool: apt-get install prometheus, then cargo test -- --include-ignored"]
fn live_metrics_pass_promtool_check_metrics() {
    let promtool_bin = tool("promtool");
    let bus = TempBus::start_with(&["--backlog-messages", "50"]);
    let (stop, worker) = start_load(&bus);
    let names = [
        "fifobus_messages_published_total{topic=\"load.a\"}",
        "fifobus_messages_dropped_total{reason=\"backlog-drop-oldest\"}",
        "fifobus_client_backlog_messages{client=\"stuck\"}",
        "fifobus_delivery_latency_seconds_bucket",
        "fifobus_protocol_errors_total{kind=\"unknown-command\"}",
        "fifobus_handshakes_rejected_total{reason=\"bad-hello\"}",
        "fifobus_clients 3",
        "process_resident_memory_bytes",
    ];
    // The load runs in the background; wait until it has touched every series.
    let text = poll(Duration::from_secs(30), || {
        let text = http_get(&metrics_url(&bus)).ok()?;
        names.iter().all(|n| text.contains(n)).then_some(text)
    });
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    let text = text.unwrap_or_else(|| {
        let now = http_get(&metrics_url(&bus)).unwrap_or_default();
        let missing: Vec<_> = names.iter().filter(|n| !now.contains(*n)).collect();
        panic!("missing from /metrics: {missing:?}\n{now}")
    });
    let (ok, out) = promtool(&promtool_bin, &["check", "metrics"], Some(text.as_bytes()));
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics:\n{out}"
    );
    assert_eq!(
        http_get(&metrics_url(&bus).replace("/metrics", "/healthz")).unwrap(),
        "ok\n"
    );
}

struct Prometheus {
    child: Child,
    url: String,
    _data: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_prometheus(bin: &Path, target: &str) -> Prometheus {
    start_prometheus_with(
        bin,
        &format!("  - job_name: fifobus\n    static_configs: [{{targets: ['{target}']}}]\n"),
    )
}

/// A Prometheus with the alert rules and these `scrape_configs` entries.
fn start_prometheus_with(bin: &Path, scrape_configs: &str) -> Prometheus {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: ['{}']\nscrape_configs:\n{scrape_configs}",
            repo("deploy/prometheus/alerts.yml").display()
        ),
    )
    .unwrap();
    let port = free_port();
    let log = std::fs::File::create(data.path().join("prometheus.log")).unwrap();
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            data.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _data: data,
    }
}

/// Polls `check` every 200 ms until it returns Some, for at most `limit`.
/// Prometheus offers no notification for "scraped" or "evaluated", so this
/// is the one place that polls; it is bounded in time and count.
fn poll<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn query(prom: &Prometheus, expr: &str) -> serde_json::Value {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let body = agent
        .get(format!("{}/api/v1/query", prom.url))
        .query("query", expr)
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .unwrap_or_else(|e| panic!("query {expr}: {e}"));
    serde_json::from_str(&body).unwrap()
}

/// Every `expr` of the dashboard, with Grafana's `$__rate_interval` filled in.
fn dashboard_queries() -> Vec<String> {
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("grafana/dashboards/fifobus.json")).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            out.push(
                target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "15s")
                    // The job and instance variables, as Grafana's "All".
                    .replace("$job", ".+")
                    .replace("$instance", ".+"),
            );
        }
    }
    assert!(out.len() >= 20, "the dashboard has its queries");
    out
}

/// The dashboard works for any job name and any number of brokers: job and
/// instance variables that every query filters on, and one unit per panel
/// (each panel declares it, and shows one kind of quantity).
#[test]
fn dashboard_has_job_and_instance_variables_and_a_unit_per_panel() {
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("grafana/dashboards/fifobus.json")).unwrap(),
    )
    .unwrap();
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(
        vars.contains(&"job") && vars.contains(&"instance"),
        "{vars:?}"
    );
    for panel in dash["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        assert!(
            panel["fieldConfig"]["defaults"]["unit"].is_string(),
            "{title}: no unit"
        );
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            assert!(
                expr.contains(r#"job=~"$job""#) && expr.contains(r#"instance=~"$instance""#),
                "{title}: {expr}"
            );
            assert!(
                !expr.contains(r#"job="fifobus""#),
                "{title}: a fixed job: {expr}"
            );
        }
        // The panel that mixed CPU seconds, MiB and descriptors is gone.
        let exprs: Vec<&str> = panel["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["expr"].as_str().unwrap())
            .collect();
        let process = exprs.iter().filter(|e| e.contains("process_")).count();
        assert!(process <= 1, "{title} mixes process metrics: {exprs:?}");
    }
}

/// Every dashboard query evaluates and returns at least one series. The
/// NATS bridge's panels need a bridge (crates/bridge/tests checks that it
/// exposes every series they use): here they must only evaluate.
fn assert_every_dashboard_query_returns_data(prom: &Prometheus) {
    for expr in dashboard_queries() {
        let v = query(prom, &expr);
        assert_eq!(v["status"], "success", "{expr}: {v}");
        if expr.contains("fifobus_bridge_") {
            continue;
        }
        let result = v["data"]["result"].as_array().unwrap();
        assert!(
            !result.is_empty(),
            "dashboard query returned no data: {expr}"
        );
    }
}

/// `HOST:PORT` of the bus's metrics endpoint.
fn target_of(bus: &TempBus) -> String {
    metrics_url(bus)
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned()
}

/// Waits until Prometheus is ready and has scraped `job` at least `n` times.
fn wait_scraped(prom: &Prometheus, job: &str, n: f64) {
    let ready = poll(Duration::from_secs(30), || {
        http_get(&format!("{}/-/ready", prom.url)).ok()
    });
    assert!(ready.is_some(), "prometheus did not become ready");
    let scraped = poll(Duration::from_secs(60), || {
        let v = query(prom, &format!(r#"count_over_time(up{{job="{job}"}}[1m])"#));
        let got: f64 = v["data"]["result"][0]["value"][1].as_str()?.parse().ok()?;
        (got >= n).then_some(got)
    });
    assert!(scraped.is_some(), "prometheus did not scrape job {job}");
}

/// The health and last error of each active target, by job.
fn targets(prom: &Prometheus) -> Vec<(String, String, String)> {
    let body = http_get(&format!("{}/api/v1/targets?state=active", prom.url)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["data"]["activeTargets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["labels"]["job"].as_str().unwrap_or_default().to_owned(),
                t["health"].as_str().unwrap_or_default().to_owned(),
                t["lastError"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A real Prometheus sends the token from `authorization: credentials_file`
/// and the token-protected target is up; a job without it is down with 401.
#[test]
#[ignore = "needs the prometheus server: apt-get install prometheus, then cargo test -- --include-ignored"]
fn prometheus_scrapes_a_token_protected_broker_with_credentials_file() {
    use std::os::unix::fs::PermissionsExt;
    let prometheus_bin = tool("prometheus");
    let mut bus = TempBus::new(BusOptions::default()).unwrap();
    let token = bus.tmp.path().join("metrics.token");
    std::fs::write(&token, "c0ffee-9d2b47a1e5f3-token\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    bus.spawn(&["--metrics-token-file", token.to_str().unwrap()]);
    let target = target_of(&bus);
    let prom = start_prometheus_with(
        &prometheus_bin,
        &format!(
            "  - job_name: fifobus\n    authorization: {{type: Bearer, credentials_file: '{}'}}\n    static_configs: [{{targets: ['{target}']}}]\n  - job_name: no-token\n    static_configs: [{{targets: ['{target}']}}]\n",
            token.display()
        ),
    );
    wait_scraped(&prom, "fifobus", 2.0);
    let seen = poll(Duration::from_secs(30), || {
        let t = targets(&prom);
        (t.len() == 2 && t.iter().all(|(_, health, _)| health != "unknown")).then_some(t)
    })
    .expect("both targets were scraped");
    for (job, health, error) in &seen {
        match job.as_str() {
            "fifobus" => assert_eq!((health.as_str(), error.as_str()), ("up", ""), "{seen:?}"),
            _ => {
                assert_eq!(health, "down", "{seen:?}");
                assert!(error.contains("401"), "{seen:?}");
            }
        }
    }
    let up = query(&prom, r#"up{job="fifobus"}"#);
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    let clients = query(&prom, r#"fifobus_clients{job="fifobus"}"#);
    assert_eq!(
        clients["data"]["result"].as_array().unwrap().len(),
        1,
        "{clients}"
    );
}

/// With topic and client labels off, `/metrics` names nothing, and every
/// dashboard query still returns data (they sum over topics and clients).
#[test]
#[ignore = "needs the prometheus server: apt-get install prometheus, then cargo test -- --include-ignored"]
fn with_labels_off_every_dashboard_query_still_returns_data() {
    let prometheus_bin = tool("prometheus");
    let bus = TempBus::start_with(&[
        "--backlog-messages",
        "50",
        "--metrics-topic-labels",
        "off",
        "--metrics-client-labels",
        "off",
    ]);
    let (stop, worker) = start_load(&bus);
    let prom = start_prometheus(&prometheus_bin, &target_of(&bus));
    wait_scraped(&prom, "fifobus", 6.0);
    // The load's drops and rejections must have been scraped too.
    let dropped = poll(Duration::from_secs(30), || {
        let v = query(&prom, "sum(fifobus_messages_dropped_total)");
        let n: f64 = v["data"]["result"][0]["value"][1].as_str()?.parse().ok()?;
        (n > 0.0).then_some(n)
    });
    assert!(dropped.is_some(), "the load's drops were not scraped");
    assert_every_dashboard_query_returns_data(&prom);
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();

    let total = query(&prom, "sum(rate(fifobus_messages_published_total[1m]))");
    let rate: f64 = total["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rate > 0.0, "{total}");
    for expr in [
        r#"count(fifobus_messages_published_total{topic!="_all"})"#,
        r#"count(fifobus_client_backlog_messages{client!="_all"})"#,
    ] {
        let v = query(&prom, expr);
        assert_eq!(v["data"]["result"], serde_json::json!([]), "{expr}: {v}");
    }
    let text = http_get(&metrics_url(&bus)).unwrap();
    assert!(!text.contains("load."), "topic names leaked:\n{text}");
    for name in ["reader", "stuck", "publisher"] {
        let label = format!(r#""{name}""#);
        assert!(!text.contains(&label), "client name {name} leaked:\n{text}");
    }
}

#[test]
#[ignore = "needs the prometheus server: apt-get install prometheus, then cargo test -- --include-ignored"]
fn prometheus_scrapes_the_broker_and_every_dashboard_and_alert_query_evaluates() {
    let prometheus_bin = tool("prometheus");
    let bus = TempBus::start_with(&["--backlog-messages", "50"]);
    let target = metrics_url(&bus)
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    let (stop, worker) = start_load(&bus);
    let prom = start_prometheus(&prometheus_bin, &target);
    let ready = poll(Duration::from_secs(30), || {
        http_get(&format!("{}/-/ready", prom.url)).ok()
    });
    assert!(ready.is_some(), "prometheus did not become ready");
    // Enough scrapes for rate() over 15s windows.
    let scraped = poll(Duration::from_secs(60), || {
        let v = query(&prom, r#"count_over_time(up{job="fifobus"}[1m])"#);
        let n: f64 = v["data"]["result"][0]["value"][1].as_str()?.parse().ok()?;
        (n >= 6.0).then_some(n)
    });
    assert!(scraped.is_some(), "prometheus did not scrape the broker");
    let up = query(&prom, r#"up{job="fifobus"}"#);
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");

    assert_every_dashboard_query_returns_data(&prom);

    // Alert rules: Prometheus evaluates them itself; each must have been
    // evaluated without error.
    let rules = poll(Duration::from_secs(30), || {
        let body = http_get(&format!("{}/api/v1/rules", prom.url)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let rules: Vec<serde_json::Value> = v["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = rules.iter().all(|r| {
            !r["lastEvaluation"]
                .as_str()
                .unwrap_or("0001")
                .starts_with("0001")
        });
        (rules.len() == 4 && evaluated).then_some(rules)
    })
    .expect("alert rules were not all evaluated");
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    for r in &rules {
        assert_eq!(
            r["health"], "ok",
            "rule {} failed: {}",
            r["name"], r["lastError"]
        );
    }
    // The load drops messages and a HELLO was refused: those alerts fire.
    let firing: Vec<&str> = rules
        .iter()
        .filter(|r| r["state"] != "inactive")
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(firing.contains(&"FifobusMessagesDropped"), "{firing:?}");
    assert!(firing.contains(&"FifobusHandshakesRejected"), "{firing:?}");
}
