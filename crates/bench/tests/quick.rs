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
