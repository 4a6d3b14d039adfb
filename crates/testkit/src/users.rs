//! Throwaway Unix users for security tests: every security claim is tested
//! with real, unprivileged users, not with mocks of the kernel's checks.
//!
//! Creating users needs root (CI runs as root). Each user gets a unique
//! name, no home directory and no login shell, and is deleted on drop.
//! Tests that need users call [`User::create`], which fails with a clear
//! message when not run as root (run such tests with `sudo -E cargo test`),
//! and mark themselves `#[ignore = "needs root: creates throwaway users"]`
//! so a plain `cargo test` as an ordinary user lists them instead of failing.

use std::ffi::OsStr;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A user that exists until dropped.
#[derive(Debug)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl User {
    /// Creates a new user (and its own group) named `fbt<pid>-<n>-<tag>`.
    ///
    /// # Panics
    /// When not root, or when `useradd` keeps failing: the test cannot run.
    pub fn create(tag: &str) -> User {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test creates throwaway users and needs root (CI runs as root; locally: sudo -E cargo test -- --include-ignored)"
        );
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // useradd limits names to 32 characters.
        let mut name = format!("fbt{}-{n}-{tag}", std::process::id());
        name.truncate(32);
        // Parallel tests run useradd at once; it may find /etc/passwd
        // locked (exit 10 on Debian): retry for a bounded time.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("useradd")
                .args([
                    "--no-create-home",
                    "--user-group",
                    "--shell",
                    "/usr/sbin/nologin",
                ])
                .arg(&name)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run useradd: {e}"));
            if out.status.success() {
                break;
            }
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                Instant::now() < deadline && err.contains("lock"),
                "useradd {name} failed: {err}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let user = nix::unistd::User::from_name(&name)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("user {name} was created but cannot be looked up"));
        User {
            name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }
    }

    /// A command that runs as this user (its uid and gid; std drops root's
    /// supplementary groups when it sets the uid), with `HOME` and `XDG_RUNTIME_DIR` cleared so it uses nothing
    /// of root's.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(program);
        c.uid(self.uid)
            .gid(self.gid)
            .env_remove("XDG_RUNTIME_DIR")
            .env("HOME", "/nonexistent");
        c
    }
}

impl Drop for User {
    fn drop(&mut self) {
        // Any process still running as the user would make userdel fail:
        // tests reap what they start before dropping the user.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Command::new("userdel").arg(&self.name).output() {
                Ok(o) if o.status.success() => return,
                Ok(o)
                    if Instant::now() < deadline
                        && String::from_utf8_lossy(&o.stderr).contains("lock") =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(o) => {
                    eprintln!(
                        "userdel {} failed: {}",
                        self.name,
                        String::from_utf8_lossy(&o.stderr)
                    );
                    return;
                }
                Err(e) => {
                    eprintln!("cannot run userdel: {e}");
                    return;
                }
            }
        }
    }
}

/// Whether the `useradd` tool is there (Debian: the `passwd` package).
pub fn available() -> io::Result<bool> {
    Ok(Command::new("useradd")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok())
}
