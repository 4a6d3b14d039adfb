//! deploy/ as an operator uses it: the compose command line as written in
//! the compose file, run by bash; the system unit's hardening as
//! `systemd-analyze security` rates it; what the image build is sent.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(tool).is_file())
}

/// `docker compose` (the plugin), else the standalone `docker-compose`.
fn compose() -> Option<&'static str> {
    let plugin = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if plugin {
        Some("docker compose")
    } else if on_path("docker-compose") {
        Some("docker-compose")
    } else {
        None
    }
}

/// The documented command line, with `config` for `up --build`: it parses
/// in bash (the old `UID=$(id -u)` did not: bash's UID is read-only) and
/// runs the broker as the caller's uid and gid; without the variables,
/// compose refuses instead of picking some uid.
#[test]
#[ignore = "needs docker compose (or docker-compose): apt-get install docker-compose"]
fn compose_command_line_works_in_bash_and_runs_the_broker_as_you() {
    let compose = compose().expect("docker compose or docker-compose is needed");
    let file = std::fs::read_to_string(repo("deploy/docker-compose.yml")).unwrap();
    let documented = file
        .lines()
        .find_map(|l| {
            l.strip_prefix("#   ")
                .filter(|l| l.contains("docker compose -f"))
        })
        .expect("the compose file documents its command line")
        .replace("up --build", "config")
        .replace("docker compose", compose);
    let out = Command::new("bash")
        .arg("-c")
        .arg(&documented)
        .current_dir(repo(""))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{documented}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids = |flag: &str| {
        let o = Command::new("id").arg(flag).output().unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    let user = format!("{}:{}", ids("-u"), ids("-g"));
    assert!(
        stdout.lines().any(|l| {
            let l = l.trim();
            l == format!("user: {user}") || l == format!("user: '{user}'")
        }),
        "{stdout}"
    );
    let bare = Command::new("bash")
        .arg("-c")
        .arg(format!("{compose} -f deploy/docker-compose.yml config"))
        .current_dir(repo(""))
        .env_remove("FIFOBUS_UID")
        .env_remove("FIFOBUS_GID")
        .output()
        .unwrap();
    assert!(!bare.status.success(), "compose ran without FIFOBUS_UID");
    assert!(
        String::from_utf8_lossy(&bare.stderr).contains("set FIFOBUS_UID and FIFOBUS_GID"),
        "{}",
        String::from_utf8_lossy(&bare.stderr)
    );
}

/// The system unit rates "OK" or better, and every hardening directive
/// stands under a comment that says why.
#[test]
#[ignore = "needs systemd-analyze (systemd 252 or later): apt-get install systemd"]
fn system_unit_rates_ok_in_systemd_analyze_security() {
    assert_rates_ok_with_reasons(&repo("deploy/fifobus.service"));
}

/// The same for the NATS bridge's unit (docs/scale-out.md).
#[test]
#[ignore = "needs systemd-analyze (systemd 252 or later): apt-get install systemd"]
fn bridge_unit_rates_ok_in_systemd_analyze_security() {
    assert_rates_ok_with_reasons(&repo("deploy/fifobus-bridge.service"));
}

/// The NATS cluster example is a configuration nats-server accepts.
#[test]
#[ignore = "needs nats-server: apt-get install nats-server"]
fn nats_cluster_config_is_valid() {
    let out = Command::new("nats-server")
        .args(["-t", "-c"])
        .arg(repo("deploy/nats/cluster.conf"))
        .output()
        .expect("nats-server is needed: apt-get install nats-server");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_rates_ok_with_reasons(unit: &std::path::Path) {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit)
        .output()
        .expect("systemd-analyze is needed");
    let text = String::from_utf8_lossy(&out.stdout);
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("{text}{}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        overall.contains(" OK") || overall.contains(" SAFE"),
        "{overall}"
    );
    // Under "# Hardening.", directives come in blocks each led by a comment.
    let body = std::fs::read_to_string(unit).unwrap();
    let hardening = body
        .split("# Hardening.")
        .nth(1)
        .expect("a Hardening section");
    let hardening = hardening.split("[Install]").next().unwrap();
    let mut commented = false;
    for line in hardening.lines().skip(1) {
        if line.starts_with('#') {
            commented = true;
        } else if line.trim().is_empty() {
            commented = false;
        } else {
            assert!(commented, "no comment says why: {line}");
        }
    }
}

/// The image build gets the sources, not gigabytes of target/ or .git.
#[test]
fn dockerignore_keeps_target_and_git_out_of_the_build_context() {
    let ignore = std::fs::read_to_string(repo(".dockerignore")).unwrap();
    let lines: Vec<&str> = ignore.lines().map(str::trim).collect();
    assert!(
        lines.contains(&"target/") && lines.contains(&".git"),
        "{ignore}"
    );
}

/// `systemctl reload` is the upgrade path in every unit: `ExecReload=` is
/// `ExecStart=` plus `--replace --detach` (same bus, same options), the
/// new broker may send `MAINPID=` (`NotifyAccess=all`), and stopping stays
/// `SIGTERM` (BYE to every client).
#[test]
fn units_reload_by_replacing_the_broker_with_the_same_arguments() {
    for name in [
        "deploy/fifobus.service",
        "deploy/fifobus-shared.service",
        "deploy/fifobus.user.service",
    ] {
        let unit = std::fs::read_to_string(repo(name)).unwrap();
        let values = |key: &str| -> Vec<&str> {
            unit.lines()
                .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .collect()
        };
        let start = values("ExecStart");
        let reload = values("ExecReload");
        assert_eq!(start.len(), 1, "{name}: {start:?}");
        assert_eq!(
            reload,
            vec![format!("{} --replace --detach", start[0])],
            "{name}"
        );
        assert_eq!(values("NotifyAccess"), vec!["all"], "{name}");
        assert_eq!(values("KillSignal"), vec!["SIGTERM"], "{name}");
        assert_eq!(values("Type"), vec!["notify"], "{name}");
    }
}
