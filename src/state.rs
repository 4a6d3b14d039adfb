//! Durable client state: what a broker needs to serve a client again after
//! a crash (docs/architecture.md, "Restart survival").
//!
//! One file per client in `<bus>/state/` (0700, the broker's alone: never in
//! `clients/<uuid>/`, which a client on a `--shared` bus owns and could
//! write). Each file is written whole under a temporary name created
//! `O_EXCL|O_NOFOLLOW` and renamed over the old one, so a reader sees the
//! previous version or the next, never a mix; a file cut short by a full
//! disk or garbled by hand fails [`ClientRecord::parse`] and only that
//! client is lost.
//!
//! Writes are coalesced: the router marks a client whose subscriptions
//! changed (a set insert, no I/O on the command path), and one writer task
//! ([`run_writer`]) wakes at most every [`COALESCE`], takes the set and the
//! current subscriptions of those clients from the router, and writes one
//! file per client. A burst of 100k `SUB`s costs a few writes, not 100k.
//! A client's first file is written by `session::create` before its
//! `WELCOME`, so a client that was told it is welcome can be adopted.
//!
//! The format is line-based text, versioned by its first line, parsed
//! strictly (an unknown key, a missing field or a missing `end` rejects the
//! file):
//!
//! ```text
//! fifobus-client-state 1
//! uuid 5b0c2f8e-6c51-4a4e-9d0e-1f1a7c1e2d3b
//! name worker-1          (optional: the HELLO's name=)
//! pid 4242               (optional: the HELLO's pid=)
//! uid 1000               (the client's identity: the owner of its reply FIFO)
//! send 64769 1234        (device and inode of clients/<uuid>/send)
//! recv 64769 1235
//! sub chat.>             (repeated: the argument text of one SUB, verbatim)
//! end
//! ```
//!
//! A `sub` line holds everything after `SUB ` as `Command::encode` writes
//! it, options included (`sub jobs.> queue=workers`, `sub t lossless`), and
//! is replayed through `Command::parse`, so options a `SUB` may carry
//! persist with no change to this format. At adoption they are subscribed
//! again through the router's `SUB` path, so the ACL and the limits judge
//! them again.
//!
//! Retained messages (`RETAIN`) are kept in one more file, [`RETAINED`],
//! written the same way (whole, renamed over the old one, coalesced by the
//! same writer) and loaded before any client is adopted or accepted:
//!
//! ```text
//! fifobus-retained 1
//! sensors.temp 21.5      (repeated: a topic, one space, the payload bytes)
//! end
//! ```
//!
//! A payload is any bytes but a newline (no line can carry one), so a line
//! is split at its first space only. A torn or garbled file is reported and
//! ignored: the broker starts with no retained messages.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fchmod, fstat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

use crate::fifo::FileId;
use crate::protocol::{Command, SubOptions};
use crate::router::{ClientKey, RouterHandle};
use crate::topic::{Pattern, Topic};
use bytes::Bytes;

/// The broker-only directory in the bus directory that holds the files.
pub const STATE_DIR: &str = "state";
const HEADER: &str = "fifobus-client-state 1";
/// Suffix of the file holding what a client wrote that a broker read but
/// did not parse when it handed over to `serve --replace`.
pub const UNPARSED: &str = ".unparsed";
/// The file of retained messages.
pub const RETAINED: &str = "retained";
const RETAINED_HEADER: &[u8] = b"fifobus-retained 1";
/// The handover socket (`crate::control`).
pub const CONTROL: &str = "control.sock";
/// How long the writer waits after the first change before it writes, so
/// that a burst of changes is one write per client.
pub const COALESCE: Duration = Duration::from_millis(50);
/// A state file larger than this is refused when read (a client holds at
/// most `--max-subscriptions` patterns of at most a few hundred bytes).
const MAX_FILE: u64 = 64 << 20;

/// Everything needed to serve a client again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRecord {
    pub uuid: String,
    pub name: Option<String>,
    pub pid: Option<i32>,
    pub uid: u32,
    pub send: FileId,
    pub recv: FileId,
    /// The argument text of each `SUB` in force.
    pub subs: Vec<String>,
    /// `echo=no` in its HELLO (an `echo no` line; absent in older files).
    pub no_echo: bool,
}

/// The argument text of `SUB p`, as [`Command::encode`] writes it.
pub fn sub_text(p: &Pattern) -> String {
    sub_text_with(p, &SubOptions::default())
}

/// The argument text of `SUB p <opts>` (a queue membership, `lossless`),
/// as [`Command::encode`] writes it: what a `sub` line holds.
pub fn sub_text_with(p: &Pattern, opts: &SubOptions) -> String {
    let cmd = if opts.is_plain() {
        Command::Sub(p.clone())
    } else {
        Command::SubWith(p.clone(), opts.clone())
    };
    let mut out = Vec::new();
    let _ = cmd.encode(&mut out);
    let line = String::from_utf8_lossy(&out);
    line.trim_end_matches('\n')
        .strip_prefix("SUB ")
        .unwrap_or(p.as_str())
        .to_owned()
}

/// The pattern and options of a recorded `SUB`, read back as the broker
/// reads `SUB` (plain, or with `queue=` / `lossless`).
///
/// # Errors
/// A text that is not a valid `SUB` argument.
pub fn parse_sub(text: &str) -> Result<(Pattern, SubOptions), String> {
    match Command::parse(bytes::Bytes::from(format!("SUB {text}"))) {
        Ok(Some(Command::Sub(p))) => Ok((p.detached(), SubOptions::default())),
        Ok(Some(Command::SubWith(p, opts))) => Ok((
            p.detached(),
            SubOptions {
                queue: opts.queue.map(|q| q.detached()),
                lossless: opts.lossless,
            },
        )),
        Ok(_) => Err(format!("'{text}' is not a SUB argument")),
        Err(e) => Err(format!("'{text}': {}", e.text)),
    }
}

fn is_word(s: &str) -> bool {
    !s.is_empty() && !s.bytes().any(|b| b == b' ' || b == b'\n' || b == b'\r')
}

impl ClientRecord {
    /// The file's text.
    pub fn encode(&self) -> String {
        let mut s =
            String::with_capacity(160 + self.subs.iter().map(|p| p.len() + 5).sum::<usize>());
        s.push_str(HEADER);
        s.push('\n');
        s.push_str(&format!("uuid {}\n", self.uuid));
        if let Some(n) = &self.name {
            s.push_str(&format!("name {n}\n"));
        }
        if let Some(p) = self.pid {
            s.push_str(&format!("pid {p}\n"));
        }
        s.push_str(&format!("uid {}\n", self.uid));
        s.push_str(&format!("send {} {}\n", self.send.dev, self.send.ino));
        s.push_str(&format!("recv {} {}\n", self.recv.dev, self.recv.ino));
        if self.no_echo {
            s.push_str("echo no\n");
        }
        for p in &self.subs {
            s.push_str("sub ");
            s.push_str(p);
            s.push('\n');
        }
        s.push_str("end\n");
        s
    }

    /// Reads a file's text, strictly: any deviation is an error naming the line.
    ///
    /// # Errors
    /// What is wrong, for the log.
    pub fn parse(text: &str) -> Result<ClientRecord, String> {
        let Some(body) = text.strip_suffix("end\n") else {
            return Err("it does not end with 'end' (cut short, e.g. by a full disk?)".into());
        };
        let Some(body) = body.strip_suffix('\n') else {
            return Err("'end' is not on a line of its own".into());
        };
        let mut lines = body.split('\n');
        if lines.next() != Some(HEADER) {
            return Err(format!("the first line is not '{HEADER}'"));
        }
        let (mut uuid, mut name, mut pid, mut uid, mut send, mut recv) =
            (None, None, None, None, None, None);
        let mut subs = Vec::new();
        let mut echo = None;
        for (i, line) in lines.enumerate() {
            let n = i + 2;
            let (key, value) = line
                .split_once(' ')
                .ok_or_else(|| format!("line {n}: no value"))?;
            fn once<T>(slot: &Option<T>, n: usize, key: &str) -> Result<(), String> {
                match slot {
                    Some(_) => Err(format!("line {n}: '{key}' given twice")),
                    None => Ok(()),
                }
            }
            let bad = || format!("line {n}: bad {key} '{value}'");
            match key {
                "uuid" => {
                    once(&uuid, n, key)?;
                    uuid::Uuid::parse_str(value).map_err(|_| bad())?;
                    uuid = Some(value.to_owned());
                }
                "name" => {
                    once(&name, n, key)?;
                    if !is_word(value) {
                        return Err(bad());
                    }
                    name = Some(value.to_owned());
                }
                "pid" => {
                    once(&pid, n, key)?;
                    pid = Some(
                        value
                            .parse::<i32>()
                            .ok()
                            .filter(|&p| p > 0)
                            .ok_or_else(bad)?,
                    );
                }
                "uid" => {
                    once(&uid, n, key)?;
                    uid = Some(value.parse::<u32>().map_err(|_| bad())?);
                }
                "send" | "recv" => {
                    let (d, i) = value.split_once(' ').ok_or_else(bad)?;
                    let id = FileId {
                        dev: d.parse().map_err(|_| bad())?,
                        ino: i.parse().map_err(|_| bad())?,
                    };
                    let slot = if key == "send" { &mut send } else { &mut recv };
                    once(slot, n, key)?;
                    *slot = Some(id);
                }
                "echo" => {
                    once(&echo, n, key)?;
                    if value != "no" {
                        return Err(bad());
                    }
                    echo = Some(false);
                }
                "sub" => {
                    parse_sub(value).map_err(|e| format!("line {n}: bad sub {e}"))?;
                    subs.push(value.to_owned());
                }
                _ => return Err(format!("line {n}: unknown key '{key}'")),
            }
        }
        let missing = |what: &str| format!("no '{what}' line");
        Ok(ClientRecord {
            uuid: uuid.ok_or_else(|| missing("uuid"))?,
            name,
            pid,
            uid: uid.ok_or_else(|| missing("uid"))?,
            send: send.ok_or_else(|| missing("send"))?,
            recv: recv.ok_or_else(|| missing("recv"))?,
            subs,
            no_echo: echo == Some(false),
        })
    }
}

/// Retained messages, topic and payload.
pub type Retained = Vec<(Topic, Bytes)>;

/// The retained file's bytes.
pub fn encode_retained(msgs: &[(Topic, Bytes)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        32 + msgs
            .iter()
            .map(|(t, p)| t.as_bytes().len() + p.len() + 2)
            .sum::<usize>(),
    );
    out.extend_from_slice(RETAINED_HEADER);
    out.push(b'\n');
    for (t, p) in msgs {
        out.extend_from_slice(t.as_bytes());
        out.push(b' ');
        out.extend_from_slice(p);
        out.push(b'\n');
    }
    out.extend_from_slice(b"end\n");
    out
}

/// Reads the retained file, strictly: any deviation is an error naming the
/// line, and nothing of the file is used.
///
/// # Errors
/// What is wrong, for the log.
pub fn parse_retained(data: &[u8]) -> Result<Retained, String> {
    let Some(body) = data.strip_suffix(b"end\n") else {
        return Err("it does not end with 'end' (cut short, e.g. by a full disk?)".into());
    };
    let Some(body) = body.strip_suffix(b"\n") else {
        return Err("'end' is not on a line of its own".into());
    };
    let mut lines = body.split(|&b| b == b'\n');
    if lines.next() != Some(RETAINED_HEADER) {
        return Err(format!(
            "the first line is not '{}'",
            String::from_utf8_lossy(RETAINED_HEADER)
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        let space = line
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| format!("line {n}: no payload"))?;
        let (topic, payload) = (&line[..space], &line[space + 1..]);
        let topic = Topic::parse(topic).map_err(|e| format!("line {n}: bad topic: {e}"))?;
        if payload.is_empty() {
            return Err(format!("line {n}: empty payload"));
        }
        if !seen.insert(topic.clone()) {
            return Err(format!("line {n}: topic {} given twice", topic.as_str()));
        }
        out.push((topic.detached(), Bytes::copy_from_slice(payload)));
    }
    Ok(out)
}

/// A state file that could not be used, and why: for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub path: PathBuf,
    pub why: String,
}

/// `<bus>/state/`, held open; every file operation is relative to it.
pub struct StateDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl StateDir {
    /// Wraps a descriptor of `<bus>/state/` (checked by `busdir`).
    pub fn new(fd: OwnedFd, path: PathBuf) -> StateDir {
        StateDir { fd, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Writes `<uuid>` whole: temporary file (`O_EXCL|O_NOFOLLOW`, 0600),
    /// write, rename over the old one. On failure nothing is left but the
    /// previous version.
    ///
    /// # Errors
    /// The `io::Error` of the step that failed (`ENOSPC`, `EIO`, ...).
    pub fn write(&self, rec: &ClientRecord, seq: u64) -> io::Result<()> {
        self.write_atomic(&rec.uuid, rec.encode().as_bytes(), seq)
    }

    /// Writes [`RETAINED`] whole, as [`StateDir::write`] writes a client's.
    ///
    /// # Errors
    /// As [`StateDir::write`].
    pub fn write_retained(&self, msgs: &[(Topic, Bytes)], seq: u64) -> io::Result<()> {
        self.write_atomic(RETAINED, &encode_retained(msgs), seq)
    }

    /// `name` whole: temporary file (`O_EXCL|O_NOFOLLOW`, 0600), write,
    /// rename over the old one.
    fn write_atomic(&self, name: &str, data: &[u8], seq: u64) -> io::Result<()> {
        let dir = self.raw();
        let tmp = format!(".{name}.{}.{seq}", std::process::id());
        let raw = openat(
            Some(dir),
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        // SAFETY: openat just returned this descriptor; nothing else owns it.
        let mut file = fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        let written = fchmod(file.as_raw_fd(), Mode::from_bits_truncate(0o600))
            .map_err(io::Error::from)
            .and_then(|()| file.write_all(data))
            .and_then(|()| {
                renameat(Some(dir), tmp.as_str(), Some(dir), name).map_err(io::Error::from)
            });
        if written.is_err() {
            let _ = unlinkat(Some(dir), tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        written
    }

    /// The retained messages a previous broker left: none when there is
    /// no file.
    ///
    /// # Errors
    /// Why the file is unusable (for the log); the caller starts with no
    /// retained messages.
    pub fn read_retained(&self) -> Result<Retained, String> {
        match self.read_own(RETAINED)? {
            Some(data) => parse_retained(&data),
            None => Ok(Vec::new()),
        }
    }

    /// Writes `<uuid>.unparsed`: bytes a client wrote to `send` that this
    /// broker read but did not parse when it handed over (`serve --replace`).
    ///
    /// # Errors
    /// As [`StateDir::write`].
    pub fn write_unparsed(&self, uuid: &str, bytes: &[u8], seq: u64) -> io::Result<()> {
        let dir = self.raw();
        let name = format!("{uuid}{UNPARSED}");
        let tmp = format!(".{name}.{}.{seq}", std::process::id());
        let raw = openat(
            Some(dir),
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        // SAFETY: openat just returned this descriptor; nothing else owns it.
        let mut file = fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        let written = file.write_all(bytes).and_then(|()| {
            renameat(Some(dir), tmp.as_str(), Some(dir), name.as_str()).map_err(io::Error::from)
        });
        if written.is_err() {
            let _ = unlinkat(Some(dir), tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        written
    }

    /// Reads and removes `<uuid>.unparsed`; empty when there is none.
    pub fn take_unparsed(&self, uuid: &str) -> Vec<u8> {
        let name = format!("{uuid}{UNPARSED}");
        let Ok(raw) = openat(
            Some(self.raw()),
            name.as_str(),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) else {
            return Vec::new();
        };
        // SAFETY: openat just returned this descriptor; nothing else owns it.
        let file = fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        let mut out = Vec::new();
        let ours = fstat(file.as_raw_fd()).is_ok_and(|st| {
            SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
                && st.st_uid == nix::unistd::geteuid().as_raw()
        });
        if ours {
            let _ = file.take(MAX_FILE).read_to_end(&mut out);
        }
        self.remove(&name);
        out
    }

    /// Removes `<uuid>`; nothing there is not an error.
    pub fn remove(&self, uuid: &str) {
        let _ = unlinkat(Some(self.raw()), uuid, UnlinkatFlags::NoRemoveDir);
    }

    /// Reads every state file: the records that parse, and the files that
    /// do not (removed, and reported). Leftover temporary files (a crash
    /// between create and rename) are removed silently.
    ///
    /// # Errors
    /// When the directory cannot be listed.
    pub fn load_all(&self) -> io::Result<(Vec<ClientRecord>, Vec<Rejected>)> {
        let mut names = Vec::new();
        let mut listing = nix::dir::Dir::openat(
            Some(self.raw()),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        for entry in listing.iter() {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for name in names {
            if name.starts_with('.') {
                self.remove(&name);
                continue;
            }
            if name.ends_with(UNPARSED) || name == CONTROL || name == RETAINED {
                continue;
            }
            match self.read(&name) {
                Ok(rec) => good.push(rec),
                Err(why) => {
                    self.remove(&name);
                    bad.push(Rejected {
                        path: self.path.join(&name),
                        why: format!("unusable state file: {why}"),
                    });
                }
            }
        }
        Ok((good, bad))
    }

    /// The bytes of `name` in this directory, at most [`MAX_FILE`] of them,
    /// opened through the held descriptor without following a link, and
    /// only if it is a regular file of the broker's user; `None` when there
    /// is no such file.
    fn read_own(&self, name: &str) -> Result<Option<Vec<u8>>, String> {
        let raw = match openat(
            Some(self.raw()),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(raw) => raw,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(format!("cannot open it: {e}")),
        };
        // SAFETY: openat just returned this descriptor; nothing else owns it.
        let file = fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        let st = fstat(file.as_raw_fd()).map_err(|e| format!("cannot inspect it: {e}"))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG
            || st.st_uid != nix::unistd::geteuid().as_raw()
        {
            return Err("not a regular file of the broker's user".into());
        }
        let mut data = Vec::new();
        file.take(MAX_FILE)
            .read_to_end(&mut data)
            .map_err(|e| format!("cannot read it: {e}"))?;
        Ok(Some(data))
    }

    /// One file, checked: a regular file of ours, named by the uuid inside.
    fn read(&self, name: &str) -> Result<ClientRecord, String> {
        let data = self
            .read_own(name)?
            .ok_or_else(|| "cannot open it: it is gone".to_owned())?;
        let text = String::from_utf8(data).map_err(|_| "cannot read it: not UTF-8".to_owned())?;
        let rec = ClientRecord::parse(&text)?;
        if rec.uuid != name {
            return Err(format!("it names client {}, not {name}", rec.uuid));
        }
        Ok(rec)
    }
}

/// What changed since the state writer last asked the router.
#[derive(Debug, Default)]
pub struct Dirty {
    /// Clients whose subscriptions changed, with the argument text of every
    /// `SUB` each now holds.
    pub clients: Vec<(ClientKey, Vec<String>)>,
    /// Every retained message, when any changed.
    pub retained: Option<Retained>,
}

/// The files of live clients: who is registered (and so may be written),
/// and the one writer's lock. Registering, writing and forgetting a client
/// hold the same lock, so a write can never bring back the file of a
/// client that has just been forgotten.
pub struct StateStore {
    dir: StateDir,
    live: Mutex<HashMap<ClientKey, ClientRecord>>,
    seq: AtomicU64,
    /// The retained messages last given to [`StateStore::update`], kept to
    /// write them again after a failed write.
    retained: Mutex<Option<Retained>>,
    /// Writes that failed (`fifobus_state_write_errors_total`).
    counters: Arc<crate::counters::Counters>,
    throttle: crate::throttle::LogThrottle,
}

impl StateStore {
    pub fn new(dir: StateDir, counters: Arc<crate::counters::Counters>) -> Arc<StateStore> {
        Arc::new(StateStore {
            dir,
            live: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            retained: Mutex::new(None),
            counters,
            throttle: crate::throttle::LogThrottle::default(),
        })
    }

    pub fn dir(&self) -> &StateDir {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, ClientRecord>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new (or adopted) client: its file is written now. A failure is
    /// logged and counted; the client is served anyway (it just would not
    /// survive a crash until a later write succeeds).
    pub fn register(&self, key: ClientKey, rec: ClientRecord) {
        let mut live = self.lock();
        self.write_logged(&rec);
        live.insert(key, rec);
    }

    /// The client ended: its file goes, and no later write brings it back.
    pub fn forget(&self, key: ClientKey) {
        let mut live = self.lock();
        if let Some(rec) = live.remove(&key) {
            self.dir.remove(&rec.uuid);
        }
    }

    /// New subscriptions of live clients and new retained messages, from
    /// the router; written now.
    pub fn update(&self, changed: Dirty) {
        if let Some(msgs) = changed.retained {
            let mut kept = self.retained.lock().unwrap_or_else(|p| p.into_inner());
            self.write_retained_logged(&msgs);
            *kept = Some(msgs);
        }
        for (key, subs) in changed.clients {
            let mut live = self.lock();
            let Some(rec) = live.get_mut(&key) else {
                continue;
            };
            rec.subs = subs;
            let rec = rec.clone();
            self.write_logged(&rec);
            drop(live);
        }
    }

    /// Saves what `uuid`'s reader read but did not parse (handover).
    pub fn save_unparsed(&self, uuid: &str, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.dir.write_unparsed(uuid, bytes, seq) {
            tracing::error!(
                "cannot save the {} bytes client {uuid} wrote that were read but not yet parsed, in {}: {e}; they are lost",
                bytes.len(),
                self.dir.path().display()
            );
        }
    }

    /// Writes every live client again (after errors: the disk may have room now).
    fn rewrite_all(&self) {
        {
            let kept = self.retained.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(msgs) = kept.as_ref() {
                self.write_retained_logged(msgs);
            }
        }
        let live = self.lock();
        for rec in live.values() {
            self.write_logged(rec);
        }
    }

    fn write_retained_logged(&self, msgs: &[(Topic, Bytes)]) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.dir.write_retained(msgs, seq) {
            self.counters
                .state_write_errors
                .fetch_add(1, Ordering::Relaxed);
            crate::warn_throttled!(
                self.throttle,
                "retained-write",
                "cannot write the retained messages to {}: {e}; {}. Serving continues, but the retained messages would not survive a broker restart until a later write succeeds (retried every few seconds; counted in fifobus_state_write_errors_total)",
                self.dir.path().join(RETAINED).display(),
                write_hint(&e)
            );
        }
    }

    fn write_logged(&self, rec: &ClientRecord) -> bool {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        match self.dir.write(rec, seq) {
            Ok(()) => true,
            Err(e) => {
                self.counters
                    .state_write_errors
                    .fetch_add(1, Ordering::Relaxed);
                let path = self.dir.path().join(&rec.uuid);
                let hint = write_hint(&e);
                crate::warn_throttled!(
                    self.throttle,
                    "state-write",
                    "cannot write client state {}: {e}; {hint}. Serving continues, but this client would not survive a broker crash until a later write succeeds (retried every few seconds; counted in fifobus_state_write_errors_total)",
                    path.display()
                );
                false
            }
        }
    }
}

/// What to do about a failed state write.
fn write_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => {
            "the filesystem is full: free space there (or give the bus directory a larger tmpfs)"
        }
        Some(libc::EIO) => "the device reported an I/O error: check it (dmesg)",
        _ => "check the state directory's permissions and space",
    }
}

/// How often the writer tries again after a failed write.
const RETRY: Duration = Duration::from_secs(2);

/// The one writer: waits for the router to mark a change, lets changes
/// gather for [`COALESCE`], then takes them and writes. After a failure it
/// rewrites everything every [`RETRY`] until writes succeed again.
pub async fn run_writer(
    store: Arc<StateStore>,
    router: RouterHandle,
    changed: Arc<tokio::sync::Notify>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut failing = false;
    loop {
        let retry = async {
            if failing {
                tokio::time::sleep(RETRY).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let woken_by_change = tokio::select! {
            () = cancel.cancelled() => return,
            () = changed.notified() => true,
            () = retry => false,
        };
        if woken_by_change {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(COALESCE) => {}
            }
        }
        let Some(dirty) = router.take_dirty().await else {
            return;
        };
        let before = store.counters.state_write_errors.load(Ordering::Relaxed);
        let s = store.clone();
        let retry_all = !woken_by_change;
        let _ = tokio::task::spawn_blocking(move || {
            if retry_all {
                s.rewrite_all();
            }
            s.update(dirty);
        })
        .await;
        let failed_now = store.counters.state_write_errors.load(Ordering::Relaxed) != before;
        if failing && !failed_now && retry_all {
            tracing::info!(
                "client state is being written again in {}",
                store.dir.path().display()
            );
        }
        failing = failed_now || (failing && !retry_all);
    }
}

/// Opens (creating it if needed) `<bus>/state/`: a directory of the
/// broker's user that nobody else may reach (0700), or an error naming
/// what is in its place.
///
/// # Errors
/// `Err(description)` when something not ours is there.
pub fn open_state_dir(bus: RawFd) -> io::Result<OwnedFd> {
    match nix::sys::stat::mkdirat(Some(bus), STATE_DIR, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(e.into()),
    }
    let raw = openat(
        Some(bus),
        STATE_DIR,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let st = fstat(fd.as_raw_fd())?;
    if st.st_uid != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("it belongs to uid {}", st.st_uid),
        ));
    }
    fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o700))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> ClientRecord {
        ClientRecord {
            uuid: "5b0c2f8e-6c51-4a4e-9d0e-1f1a7c1e2d3b".into(),
            name: Some("worker-1".into()),
            pid: Some(4242),
            uid: 1000,
            send: FileId { dev: 7, ino: 11 },
            recv: FileId { dev: 7, ino: 12 },
            subs: vec!["chat.>".into(), "a.*.c".into()],
            no_echo: true,
        }
    }

    #[test]
    fn round_trips() {
        let r = rec();
        assert_eq!(ClientRecord::parse(&r.encode()), Ok(r.clone()));
        let bare = ClientRecord {
            name: None,
            pid: None,
            subs: vec![],
            no_echo: false,
            ..r
        };
        assert_eq!(ClientRecord::parse(&bare.encode()), Ok(bare.clone()));
        assert!(
            !bare.encode().contains("echo"),
            "echo=yes writes nothing: a file an older broker wrote reads the same"
        );
    }

    #[test]
    fn every_cut_of_a_file_is_refused() {
        let text = rec().encode();
        for cut in 0..text.len() {
            assert!(
                ClientRecord::parse(&text[..cut]).is_err(),
                "accepted a file cut at {cut}: {:?}",
                &text[..cut]
            );
        }
    }

    #[test]
    fn garbage_and_unknown_keys_are_refused() {
        let text = rec().encode();
        for bad in [
            text.replace("fifobus-client-state 1", "fifobus-client-state 2"),
            text.replace("uid 1000", "uid x"),
            text.replace("uid 1000\n", ""),
            text.replace("pid 4242", "pid 0"),
            text.replace("sub chat.>", "sub chat..x"),
            text.replace("name worker-1", "colour blue"),
            text.replace("uuid ", "uuid x"),
            text.replace("end\n", "end\nmore\n"),
            text.replace("echo no", "echo yes"),
            text.replace("echo no\n", "echo no\necho no\n"),
            format!("{text}\0\0\0"),
        ] {
            assert!(ClientRecord::parse(&bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn sub_text_is_what_sub_reads_back() {
        let p = Pattern::parse(b"chat.*.>").unwrap();
        let t = sub_text(&p);
        assert_eq!(t, "chat.*.>");
        assert_eq!(parse_sub(&t).unwrap(), (p, SubOptions::default()));
    }

    #[test]
    fn sub_lines_keep_their_options() {
        let p = Pattern::parse(b"jobs.>").unwrap();
        for (opts, text) in [
            (
                SubOptions {
                    queue: Some(crate::protocol::QueueName::parse(b"workers").unwrap()),
                    lossless: false,
                },
                "jobs.> queue=workers",
            ),
            (
                SubOptions {
                    queue: None,
                    lossless: true,
                },
                "jobs.> lossless",
            ),
        ] {
            assert_eq!(sub_text_with(&p, &opts), text);
            assert_eq!(parse_sub(text).unwrap(), (p.clone(), opts));
        }
        let r = ClientRecord {
            subs: vec![
                "jobs.> queue=workers".into(),
                "t lossless".into(),
                "a.b".into(),
            ],
            ..rec()
        };
        assert_eq!(ClientRecord::parse(&r.encode()), Ok(r));
        for bad in ["jobs.> queue=", "jobs.> colour=red", "jobs.> queue=a b"] {
            let text = rec().encode().replace("sub a.*.c", &format!("sub {bad}"));
            assert!(ClientRecord::parse(&text).is_err(), "accepted {bad:?}");
        }
    }

    fn retained() -> Retained {
        vec![
            (Topic::parse(b"a.b").unwrap(), Bytes::from_static(b"x")),
            (
                Topic::parse(b"sensors.temp").unwrap(),
                Bytes::from_static(b" two  spaces\r\xff\x00 end"),
            ),
        ]
    }

    #[test]
    fn retained_round_trips_any_payload_but_newline() {
        let msgs = retained();
        assert_eq!(parse_retained(&encode_retained(&msgs)), Ok(msgs));
        assert_eq!(parse_retained(&encode_retained(&[])), Ok(vec![]));
    }

    #[test]
    fn every_cut_of_the_retained_file_is_refused() {
        let data = encode_retained(&retained());
        for cut in 0..data.len() {
            assert!(
                parse_retained(&data[..cut]).is_err(),
                "accepted a file cut at {cut}"
            );
        }
    }

    #[test]
    fn garbage_retained_files_are_refused() {
        let good = String::from_utf8_lossy(&encode_retained(&retained()[..1])).into_owned();
        assert_eq!(good, "fifobus-retained 1\na.b x\nend\n");
        for bad in [
            "fifobus-retained 2\na.b x\nend\n".to_owned(),
            "fifobus-retained 1\na.b\nend\n".to_owned(),
            "fifobus-retained 1\na.b \nend\n".to_owned(),
            "fifobus-retained 1\na..b x\nend\n".to_owned(),
            "fifobus-retained 1\na.* x\nend\n".to_owned(),
            "fifobus-retained 1\na.b x\na.b y\nend\n".to_owned(),
            "fifobus-retained 1\na.b x\nend\nmore\n".to_owned(),
            "fifobus-retained 1\na.b x\nend".to_owned(),
            format!("{good}\0\0"),
            "\0\0\0\0".to_owned(),
            String::new(),
        ] {
            assert!(parse_retained(bad.as_bytes()).is_err(), "accepted {bad:?}");
        }
    }
}
