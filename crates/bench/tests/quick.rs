//! The benchmark's smoke test: a whole quick run against real brokers (the
//! `fifobus` binary beside `fifobus-bench`; `cargo test --workspace` builds
//! both).

use fifobus_testkit::sh;

/// `fifobus-bench --quick --json` (what `fifobus bench --quick --json` runs)
/// runs every scenario against real brokers and reports each figure with its
/// ceiling. This checks the report's shape
/// only: speed is for the benchmark itself to say, never for a test.
#[test]
fn bench_quick_reports_every_scenario() {
    // The whole quick run takes tens of seconds in a debug build.
    let (status, out, err) = sh(
        r#""$B" --quick --json"#,
        &[(
            "B",
            std::ffi::OsStr::new(env!("CARGO_BIN_EXE_fifobus-bench")),
        )],
        std::time::Duration::from_secs(300),
    );
    assert!(status.success(), "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = rows.as_array().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["scenario"].as_str().unwrap())
        .collect();
    for want in [
        "1 -> 1, msg/s",
        "1 -> 1, metrics off",
        "1 -> 10",
        "10 -> 1",
        "100 topics",
        "round trip at 10000 msg/s, p50",
        "round trip at saturation, p99",
        "handshakes/s",
        "resident memory",
        "idle broker",
        "1 -> 1, broker CPU per delivery, ns",
        "1 -> 10, broker CPU per delivery, ns",
        "10 -> 1, broker CPU per delivery, ns",
        "broker CPU per delivery, ns",
    ] {
        assert!(
            names.iter().any(|n| n.contains(want)),
            "{want} missing from {names:?}"
        );
    }
    for r in rows {
        assert!(
            r["fifobus"]
                .as_f64()
                .is_some_and(|v| v.is_finite() && v >= 0.0),
            "{r}"
        );
    }
    // A scenario that silently measured nothing (e.g. no client fitting the
    // open-file limit) must not pass as a figure of 0.
    for r in rows
        .iter()
        .filter(|r| !r["scenario"].as_str().unwrap().contains("CPU"))
    {
        assert!(r["fifobus"].as_f64().unwrap() > 0.0, "{r}");
    }
    let throughput = rows
        .iter()
        .find(|r| r["scenario"] == "1 -> 1, msg/s")
        .unwrap();
    assert!(
        throughput["ceiling"].as_f64().unwrap() > 0.0 && throughput["ratio"].as_f64().is_some()
    );
    assert_eq!(throughput["target"], "ratio >= 0.5", "issue 14's target");
    // "100 topics" against its fair ceiling (issue 14's target), and the old
    // tee ceiling beside it: both measured, so the change of yardstick shows.
    let topics = |what: &str| {
        rows.iter()
            .find(|r| {
                let s = r["scenario"].as_str().unwrap();
                s.starts_with("100 topics") && s.contains(what)
            })
            .unwrap_or_else(|| panic!("no 100 topics row with {what:?} in {names:?}"))
    };
    let fair = topics("subscribers, deliveries/s");
    assert_eq!(fair["target"], "ratio >= 0.2", "{fair}");
    let old = topics("against the old ceiling");
    for r in [fair, old] {
        assert!(r["ceiling"].as_f64().is_some_and(|c| c > 0.0), "{r}");
    }
    assert_eq!(
        fair["fifobus"], old["fifobus"],
        "one broker run, two yardsticks"
    );
}

fn bench_bin() -> (&'static str, &'static std::ffi::OsStr) {
    (
        "B",
        std::ffi::OsStr::new(env!("CARGO_BIN_EXE_fifobus-bench")),
    )
}

/// `--only` with a name no group has is refused (it used to print an empty
/// table and exit 0).
#[test]
fn bench_rejects_an_unknown_only_group() {
    let (status, out, err) = sh(
        r#""$B" --only nosuch"#,
        &[bench_bin()],
        std::time::Duration::from_secs(10),
    );
    assert_eq!(status.code(), Some(2), "{err}");
    assert_eq!(out, "");
    assert!(
        err.contains("--only 'nosuch' matches no scenario group") && err.contains("'latency'"),
        "{err}"
    );
}

/// The table of a real run fits 100 columns.
#[test]
fn bench_table_fits_100_columns() {
    let (status, out, err) = sh(
        r#""$B" --quick --only "1 -> 1""#,
        &[bench_bin()],
        std::time::Duration::from_secs(120),
    );
    assert!(status.success(), "{err}");
    assert!(out.contains("1 -> 1, msg/s"), "{out}");
    for line in out.lines() {
        assert!(line.chars().count() <= 100, "{line:?}");
    }
}

/// The rows of one `--only GROUP --quick --json` run, by scenario name.
fn only_quick(group: &str) -> Vec<serde_json::Value> {
    let (status, out, err) = sh(
        r#""$B" --quick --json --only "$G""#,
        &[bench_bin(), ("G", std::ffi::OsStr::new(group))],
        std::time::Duration::from_secs(120),
    );
    assert!(status.success(), "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    rows.as_array().unwrap().clone()
}

/// `--only allocs` (issue 14) runs the broker in-process and reports
/// allocations per delivery and per message, saying which broker it
/// measured. Only the shape: the count itself is for the benchmark.
#[test]
fn bench_only_allocs_counts_the_in_process_broker() {
    let rows = only_quick("allocs");
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "allocs: 1 -> 10, broker allocations per delivery",
            "allocs: 1 -> 10, broker allocations per message"
        ]
    );
    for r in &rows {
        let v = r["fifobus"].as_f64().unwrap();
        assert!(v.is_finite() && v >= 0.0, "{r}");
        let note = r["note"].as_str().unwrap();
        assert!(
            note.contains("in-process broker")
                && note.contains("FIFOBUS_BENCH_BROKER does not apply"),
            "{note}"
        );
    }
    // Per message is per delivery times the 10 subscribers.
    let (per_delivery, per_message) = (
        rows[0]["fifobus"].as_f64().unwrap(),
        rows[1]["fifobus"].as_f64().unwrap(),
    );
    assert!((per_message - 10.0 * per_delivery).abs() <= 1e-6 * per_message.max(1.0));
}

/// `--only redis` (issue 14) puts redis-server beside fifobus in one run;
/// without redis-server on PATH it says so in a row instead of failing.
#[test]
fn bench_only_redis_compares_or_says_why_not() {
    let have_redis = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("redis-server").is_file()));
    let rows = only_quick("redis");
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["scenario"].as_str().unwrap())
        .collect();
    if !have_redis {
        assert_eq!(names, ["redis: skipped, no redis-server on PATH"]);
        return;
    }
    assert_eq!(
        names,
        [
            "redis: 1 -> 10, deliveries/s, vs redis-server",
            "redis: 1 -> 10, server CPU per delivery, ns, vs redis-server"
        ]
    );
    let rate = &rows[0];
    assert!(rate["fifobus"].as_f64().unwrap() > 0.0, "{rate}");
    assert!(rate["ceiling"].as_f64().unwrap() > 0.0, "{rate}");
    // No redis-server of the run is left behind.
    let pid = rate["note"]
        .as_str()
        .unwrap()
        .split("pid ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse::<u32>().ok())
        .expect("the note names redis-server's pid");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "redis-server {pid} still running"
    );
}
