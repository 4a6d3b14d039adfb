//! Access control for a bus shared by several users (`fifobus serve --acl FILE`).
//!
//! A [`Policy`] says which user may publish to which topics and subscribe to
//! which patterns, and how many clients, subscriptions and backlog bytes a
//! user may have. The file format is described in docs/acl.md; in short:
//!
//! ```text
//! default deny
//! allow pub    chat.>        user=alice
//! allow sub    chat.public.> user=bob group=staff
//! deny  pubsub chat.secret.> all
//! limit user=alice clients=10 subscriptions=1000 backlog=16MiB
//! ```
//!
//! Evaluation is **first match**: for a `PUB` of topic `t`, the first
//! `pub`/`pubsub` rule (in file order) that names the client and whose
//! pattern matches `t` decides; when none does, `default` decides. Receiving
//! a message on `t` is decided the same way over the `sub`/`pubsub` rules.
//! First match was chosen over "most specific wins" because it is what a
//! reader of the file can check by reading top to bottom, as with firewall
//! rules, with no notion of specificity to argue about.
//!
//! A `SUB` pattern covers many topics, so it is [`Sub::Allowed`] (every
//! topic it matches may be received), [`Sub::Denied`] (none may) or
//! [`Sub::Partial`] (some may: the subscription is accepted and deliveries
//! are filtered per topic by [`Policy::may_receive`]).
//!
//! Parsing is pure: user and group names are resolved through [`Names`],
//! which [`load`] backs with the system's databases. Group membership of a
//! connecting client ([`Identity::of_uid`]) is read once, when it connects,
//! as a login session's groups are.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::topic::{Pattern, Topic};

/// Topics under this first segment are the broker's own: no client may
/// publish there whatever the rules say.
pub const RESERVED_PREFIX: &str = "_bus";

/// A refused ACL file: which file, which line, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclError {
    pub file: PathBuf,
    /// 1-based; 0 when the error is about the file as a whole (unreadable).
    pub line: usize,
    pub message: String,
}

impl fmt::Display for AclError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "acl {}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "acl {} line {}: {}",
                self.file.display(),
                self.line,
                self.message
            )
        }
    }
}

impl std::error::Error for AclError {}

/// Who a client is, for the policy: the uid that owns its reply FIFO and
/// that user's groups (primary and supplementary) when it connected.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    pub uid: u32,
    pub groups: Vec<u32>,
    /// The user's name, if the user database has one (for messages only).
    pub name: Option<String>,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(n) => write!(f, "user {n} (uid {})", self.uid),
            None => write!(f, "uid {}", self.uid),
        }
    }
}

impl Identity {
    pub fn new(uid: u32, groups: impl Into<Vec<u32>>) -> Identity {
        Identity {
            uid,
            groups: groups.into(),
            name: None,
        }
    }

    /// The identity of `uid` with its groups from the system's databases:
    /// its primary group plus its supplementary groups (`getgrouplist`). A
    /// uid with no user entry has no groups.
    pub fn of_uid(uid: u32) -> Identity {
        use nix::unistd::{getgrouplist, Uid, User};
        let mut name = None;
        let groups = match User::from_uid(Uid::from_raw(uid)) {
            Ok(Some(u)) => {
                name = Some(u.name.clone());
                let cname = std::ffi::CString::new(u.name.as_bytes()).ok();
                let mut gids = cname
                    .and_then(|n| getgrouplist(&n, u.gid).ok())
                    .unwrap_or_default();
                gids.push(u.gid);
                let mut gids: Vec<u32> = gids.into_iter().map(|g| g.as_raw()).collect();
                gids.sort_unstable();
                gids.dedup();
                gids
            }
            _ => Vec::new(),
        };
        Identity { uid, groups, name }
    }
}

/// Resolves the names an ACL file uses. [`SystemNames`] asks the system's
/// user and group databases; tests give a table.
pub trait Names {
    fn uid(&self, user: &str) -> Option<u32>;
    fn gid(&self, group: &str) -> Option<u32>;
}

/// The system's user and group databases (NSS, through nix).
pub struct SystemNames;

impl Names for SystemNames {
    fn uid(&self, user: &str) -> Option<u32> {
        nix::unistd::User::from_name(user)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    }

    fn gid(&self, group: &str) -> Option<u32> {
        nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    }
}

/// Reads and parses `path`, resolving names with the system's databases.
///
/// The file decides what every user may do, so it is trusted only as the
/// metrics token file is: a regular file, not a symbolic link (`O_NOFOLLOW`),
/// owned by the broker's effective uid or root, and writable by nobody else
/// (whoever could write it could grant themselves anything at the next
/// SIGHUP). Others may read it: it holds rules, not secrets, though it does
/// name users and topics (`chmod 600` hides them).
///
/// # Errors
/// An unreadable or unsafe file (line 0) or the first bad line.
pub fn load(path: &Path) -> Result<Policy, AclError> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let whole = |message: String| AclError {
        file: path.to_owned(),
        line: 0,
        message,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => whole(
                "is a symbolic link; give the path of the file itself (a link lets whoever owns it choose the policy)".into(),
            ),
            _ => whole(format!("cannot read it: {e}")),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| whole(format!("cannot read it: {e}")))?;
    if !meta.file_type().is_file() {
        return Err(whole(
            "is not a regular file; give a text file of rules (docs/acl.md)".into(),
        ));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(whole(format!(
            "is owned by uid {}, not by the broker's uid {euid} or root: that user could grant anyone anything; chown {euid} {}",
            meta.uid(),
            path.display()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(whole(format!(
            "is writable by group or others (mode {mode:04o}): they could grant themselves anything; chmod go-w {}",
            path.display()
        )));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| whole(format!("cannot read it: {e}")))?;
    parse(path, &text, &SystemNames)
}

/// Who a rule or a limit is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Principal {
    User(u32),
    Group(u32),
    All,
}

impl Principal {
    fn includes(self, who: &Identity) -> bool {
        match self {
            Principal::User(uid) => who.uid == uid,
            Principal::Group(gid) => who.groups.contains(&gid),
            Principal::All => true,
        }
    }
}

/// One segment of a pattern, pre-split for the subscription analysis.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(String),
    Star,
    Tail,
}

fn segs(p: &Pattern) -> Vec<Seg> {
    p.segments()
        .map(|s| match s {
            "*" => Seg::Star,
            ">" => Seg::Tail,
            lit => Seg::Lit(lit.to_owned()),
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Rule {
    allow: bool,
    pattern: Pattern,
    segs: Vec<Seg>,
    who: Vec<Principal>,
}

impl Rule {
    fn names(&self, who: &Identity) -> bool {
        self.who.iter().any(|p| p.includes(who))
    }
}

/// Per-user caps from `limit` lines; `None`: only the broker-wide limits apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Clients connected at once with this uid.
    pub clients: Option<usize>,
    /// Subscriptions held at once by all clients of this uid.
    pub subscriptions: Option<usize>,
    /// Backlog bytes of each of this uid's clients.
    pub backlog: Option<usize>,
}

#[derive(Debug, Clone)]
struct LimitRule {
    who: Principal,
    limits: Limits,
}

/// What a `SUB` pattern may receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    /// Every topic the pattern matches.
    Allowed,
    /// No topic it matches: the `SUB` is refused.
    Denied,
    /// Some: deliveries are filtered per topic with [`Policy::may_receive`].
    Partial,
}

/// A parsed ACL, or the open policy of a broker without `--acl`.
#[derive(Debug, Clone)]
pub struct Policy {
    /// No ACL at all: everything allowed, no limits. (`_bus.` stays the
    /// broker's all the same: the router refuses it before asking.)
    open: bool,
    default_allow: bool,
    publish: Vec<Rule>,
    subscribe: Vec<Rule>,
    limits: Vec<LimitRule>,
    /// `allow`/`deny` lines in the file.
    rules: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::open()
    }
}

impl Policy {
    /// The policy of a broker without `--acl`: everything is allowed, as
    /// on a private bus where every client is the same user.
    pub fn open() -> Policy {
        Policy {
            open: true,
            default_allow: true,
            publish: Vec::new(),
            subscribe: Vec::new(),
            limits: Vec::new(),
            rules: 0,
        }
    }

    /// Whether this is the open policy (checks can be skipped altogether).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// How many `allow`/`deny` lines the file had.
    pub fn rule_count(&self) -> usize {
        self.rules
    }

    pub fn default_allows(&self) -> bool {
        self.default_allow
    }

    /// Whether `who` may publish to `topic`. Never under `_bus.` (unless
    /// the policy is open; the router refuses `_bus.` before asking).
    pub fn may_publish(&self, who: &Identity, topic: &Topic) -> bool {
        if self.open {
            return true;
        }
        if topic.segments().next() == Some(RESERVED_PREFIX) {
            return false;
        }
        first_match(&self.publish, who, topic).unwrap_or(self.default_allow)
    }

    /// Whether `who` may receive a message published to `topic`.
    pub fn may_receive(&self, who: &Identity, topic: &Topic) -> bool {
        if self.open {
            return true;
        }
        first_match(&self.subscribe, who, topic).unwrap_or(self.default_allow)
    }

    /// What a subscription to `pattern` by `who` may receive: exactly the
    /// classification of the set `{t : pattern matches t}` by
    /// [`Policy::may_receive`].
    pub fn may_subscribe(&self, who: &Identity, pattern: &Pattern) -> Sub {
        if self.open {
            return Sub::Allowed;
        }
        let rules: Vec<(&[Seg], bool)> = self
            .subscribe
            .iter()
            .filter(|r| r.names(who))
            .map(|r| (&r.segs[..], r.allow))
            .collect();
        let mut search = Search {
            rules: &rules,
            default: self.default_allow,
            allow: false,
            deny: false,
            seen: HashSet::new(),
        };
        let alive = (0..rules.len()).map(|r| (r, Progress::At(0))).collect();
        search.walk(&segs(pattern), 0, alive);
        match (search.allow, search.deny) {
            (true, false) => Sub::Allowed,
            (false, _) => Sub::Denied,
            (true, true) => Sub::Partial,
        }
    }

    /// The caps for `who`: each one from the first `limit` line that names
    /// `who` and sets it.
    pub fn limits(&self, who: &Identity) -> Limits {
        let mut out = Limits::default();
        for l in self.limits.iter().filter(|l| l.who.includes(who)) {
            out.clients = out.clients.or(l.limits.clients);
            out.subscriptions = out.subscriptions.or(l.limits.subscriptions);
            out.backlog = out.backlog.or(l.limits.backlog);
        }
        out
    }
}

fn first_match(rules: &[Rule], who: &Identity, topic: &Topic) -> Option<bool> {
    rules
        .iter()
        .find(|r| r.pattern.matches(topic) && r.names(who))
        .map(|r| r.allow)
}

/// How far a rule's pattern has matched the topic built so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Progress {
    /// The first `n` segments matched.
    At(usize),
    /// Its `>` took at least one segment: it matches whatever follows.
    Tail,
}

/// The subscription analysis: explores the topics a pattern matches, up to
/// equivalence. Segment names are unbounded, so at a wildcard only the
/// literals the live rules expect there matter, plus one name none of them
/// expects (`None`, "fresh"); and once every live rule has matched its `>`
/// or died, longer topics decide the same. Rules are few and short, and
/// states already explored are skipped, so this stays small.
struct Search<'a> {
    /// The rules naming the subscriber, in file order: segments and allow.
    rules: &'a [(&'a [Seg], bool)],
    default: bool,
    /// Some topic of the pattern may be received / may not.
    allow: bool,
    deny: bool,
    seen: HashSet<(usize, Vec<(usize, Progress)>)>,
}

type Alive = Vec<(usize, Progress)>;

impl Search<'_> {
    fn done(&self) -> bool {
        self.allow && self.deny
    }

    /// Topics built from `pattern[i..]` after a prefix that left `alive`.
    fn walk(&mut self, pattern: &[Seg], i: usize, alive: Alive) {
        if self.done() || !self.seen.insert((i, alive.clone())) {
            return;
        }
        let Some(seg) = pattern.get(i) else {
            self.decide(&alive);
            return;
        };
        match seg {
            Seg::Lit(x) => {
                let next = self.step(&alive, Some(x));
                self.walk(pattern, i + 1, next);
            }
            Seg::Star => {
                for c in self.candidates(&alive) {
                    let next = self.step(&alive, c.as_deref());
                    self.walk(pattern, i + 1, next);
                }
            }
            Seg::Tail => {
                // One segment, then either the topic ends or `>` takes more
                // (the same position again, marked by `pattern.len()`).
                for c in self.candidates(&alive) {
                    let next = self.step(&alive, c.as_deref());
                    self.decide(&next);
                    if next.iter().any(|&(_, p)| p != Progress::Tail) {
                        self.walk_more(pattern, next);
                    }
                }
            }
        }
    }

    fn walk_more(&mut self, pattern: &[Seg], alive: Alive) {
        // Position `len + 1` keys "inside the trailing `>`" in `seen`.
        let key = pattern.len() + 1;
        if self.done() || !self.seen.insert((key, alive.clone())) {
            return;
        }
        for c in self.candidates(&alive) {
            let next = self.step(&alive, c.as_deref());
            self.decide(&next);
            if next.iter().any(|&(_, p)| p != Progress::Tail) {
                self.walk_more(pattern, next);
            }
        }
    }

    /// The segment names worth trying where the topic has a wildcard.
    fn candidates(&self, alive: &Alive) -> Vec<Option<String>> {
        let mut out: Vec<Option<String>> = vec![None];
        for &(r, p) in alive {
            if let Progress::At(j) = p {
                if let Some(Seg::Lit(l)) = self.rules[r].0.get(j) {
                    if !out.iter().any(|c| c.as_deref() == Some(l)) {
                        out.push(Some(l.clone()));
                    }
                }
            }
        }
        out
    }

    /// The live rules after one more topic segment (`None`: a name no rule
    /// spells out).
    fn step(&self, alive: &Alive, seg: Option<&str>) -> Alive {
        alive
            .iter()
            .filter_map(|&(r, p)| {
                let next = match p {
                    Progress::Tail => Progress::Tail,
                    Progress::At(j) => match self.rules[r].0.get(j)? {
                        Seg::Tail => Progress::Tail,
                        Seg::Star => Progress::At(j + 1),
                        Seg::Lit(l) if Some(l.as_str()) == seg => Progress::At(j + 1),
                        Seg::Lit(_) => return None,
                    },
                };
                Some((r, next))
            })
            .collect()
    }

    /// The topic ends here: the first rule that matches it decides.
    fn decide(&mut self, alive: &Alive) {
        let allow = alive
            .iter()
            .find(|&&(r, p)| match p {
                Progress::Tail => true,
                Progress::At(j) => j == self.rules[r].0.len(),
            })
            .map_or(self.default, |&(r, _)| self.rules[r].1);
        if allow {
            self.allow = true;
        } else {
            self.deny = true;
        }
    }
}

/// Parses an ACL (the text of `file`, which is named in errors only).
///
/// # Errors
/// The first bad line: unknown keyword, bad pattern, unknown user or group,
/// bad limit, a second `default`.
pub fn parse(file: &Path, text: &str, names: &dyn Names) -> Result<Policy, AclError> {
    let mut policy = Policy {
        open: false,
        default_allow: false,
        publish: Vec::new(),
        subscribe: Vec::new(),
        limits: Vec::new(),
        rules: 0,
    };
    let mut default_line = None;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |message: String| AclError {
            file: file.to_owned(),
            line,
            message,
        };
        let content = raw.split('#').next().unwrap_or_default();
        let words: Vec<&str> = content.split_whitespace().collect();
        let Some((&keyword, rest)) = words.split_first() else {
            continue;
        };
        match keyword {
            "default" => {
                if let Some(first) = default_line {
                    return Err(err(format!(
                        "a second 'default' line (the first is line {first}); keep one"
                    )));
                }
                policy.default_allow = match rest {
                    ["allow"] => true,
                    ["deny"] => false,
                    _ => return Err(err("expected 'default allow' or 'default deny'".into())),
                };
                default_line = Some(line);
            }
            "allow" | "deny" => {
                let [action, pattern, who @ ..] = rest else {
                    return Err(err(format!(
                        "expected '{keyword} pub|sub|pubsub PATTERN user=NAME|group=NAME|all ...'"
                    )));
                };
                let (publish, subscribe) = match *action {
                    "pub" => (true, false),
                    "sub" => (false, true),
                    "pubsub" => (true, true),
                    other => return Err(err(format!("'{other}' is not pub, sub or pubsub"))),
                };
                let pattern: Pattern = pattern
                    .parse()
                    .map_err(|e| err(format!("bad pattern '{pattern}': {e}")))?;
                if who.is_empty() {
                    return Err(err(format!(
                        "the rule names nobody: add user=NAME, group=NAME or all after '{pattern}'"
                    )));
                }
                let who = who
                    .iter()
                    .map(|w| principal(w, names))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(err)?;
                let rule = Rule {
                    allow: keyword == "allow",
                    segs: segs(&pattern),
                    pattern,
                    who,
                };
                if publish {
                    policy.publish.push(rule.clone());
                }
                if subscribe {
                    policy.subscribe.push(rule);
                }
                policy.rules += 1;
            }
            "limit" => {
                let [who, settings @ ..] = rest else {
                    return Err(err(
                        "expected 'limit user=NAME|group=NAME|all clients=N subscriptions=N backlog=SIZE'".into(),
                    ));
                };
                let who = principal(who, names).map_err(err)?;
                if settings.is_empty() {
                    return Err(err(
                        "the limit sets nothing: add clients=N, subscriptions=N or backlog=SIZE"
                            .into(),
                    ));
                }
                let mut limits = Limits::default();
                for s in settings {
                    let (key, value) = s.split_once('=').ok_or_else(|| {
                        err(format!(
                            "'{s}' is not KEY=VALUE (clients, subscriptions, backlog)"
                        ))
                    })?;
                    let slot = match key {
                        "clients" => &mut limits.clients,
                        "subscriptions" => &mut limits.subscriptions,
                        "backlog" => &mut limits.backlog,
                        _ => {
                            return Err(err(format!(
                                "unknown limit '{key}' (clients, subscriptions, backlog)"
                            )))
                        }
                    };
                    if slot.is_some() {
                        return Err(err(format!("'{key}' is set twice")));
                    }
                    let n = if key == "backlog" {
                        parse_size(value)
                    } else {
                        value
                            .parse()
                            .map_err(|_| format!("'{value}' is not a whole number"))
                    }
                    .map_err(|m| err(format!("{key}: {m}")))?;
                    *slot = Some(n);
                }
                policy.limits.push(LimitRule { who, limits });
            }
            other => {
                return Err(err(format!(
                    "unknown keyword '{other}' (expected default, allow, deny or limit)"
                )))
            }
        }
    }
    Ok(policy)
}

fn principal(word: &str, names: &dyn Names) -> Result<Principal, String> {
    if word == "all" {
        return Ok(Principal::All);
    }
    match word.split_once('=') {
        Some(("user", name)) => names.uid(name).map(Principal::User).ok_or_else(|| {
            format!("unknown user '{name}' (no such user in the system's user database)")
        }),
        Some(("group", name)) => names.gid(name).map(Principal::Group).ok_or_else(|| {
            format!("unknown group '{name}' (no such group in the system's group database)")
        }),
        _ => Err(format!("'{word}' is not user=NAME, group=NAME or all")),
    }
}

/// `16MiB`, `65536`, `64K`: the units of `--backlog-bytes`.
fn parse_size(s: &str) -> Result<usize, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("'{s}': unknown unit (use K, M or G, e.g. 16MiB)")),
    };
    let n: usize = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size such as 65536 or 16MiB"))?;
    n.checked_mul(1 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("'{s}' is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// A user database for tests: alice 1001, bob 1002, carol 1003, dave
    /// 1004; group staff 2000 (alice and dave are members).
    struct Table;

    const ALICE: u32 = 1001;
    const BOB: u32 = 1002;
    const CAROL: u32 = 1003;
    const DAVE: u32 = 1004;
    const STAFF: u32 = 2000;

    impl Names for Table {
        fn uid(&self, user: &str) -> Option<u32> {
            HashMap::from([
                ("alice", ALICE),
                ("bob", BOB),
                ("carol", CAROL),
                ("dave", DAVE),
            ])
            .get(user)
            .copied()
        }
        fn gid(&self, group: &str) -> Option<u32> {
            (group == "staff").then_some(STAFF)
        }
    }

    fn id(uid: u32) -> Identity {
        let groups = if uid == ALICE || uid == DAVE {
            vec![uid, STAFF]
        } else {
            vec![uid]
        };
        Identity::new(uid, groups)
    }

    fn policy(text: &str) -> Policy {
        parse(Path::new("test.acl"), text, &Table).unwrap_or_else(|e| panic!("{e}"))
    }

    fn error(text: &str) -> String {
        parse(Path::new("test.acl"), text, &Table)
            .expect_err("should be refused")
            .to_string()
    }

    fn t(s: &str) -> Topic {
        s.parse().unwrap()
    }

    fn p(s: &str) -> Pattern {
        s.parse().unwrap()
    }

    /// The policy of the integration tests, and of docs/acl.md's example.
    const CHAT: &str = "
        # chat: alice talks, bob listens to the public rooms
        default deny
        allow pubsub chat.>           user=alice
        allow sub    chat.public.>    user=bob
        allow pub    ops.*            group=staff
        deny  sub    ops.secret       all
        allow sub    ops.>            group=staff
        limit user=alice clients=10 subscriptions=1000 backlog=16MiB
        limit all clients=2
    ";

    #[derive(Debug, Clone, Copy)]
    enum Want {
        Pub(bool),
        Sub(Sub),
    }

    /// The ACL matrix: user x pub/sub x allowed/denied/overlapping.
    #[test]
    fn acl_matrix() {
        use Sub::*;
        use Want::Sub as S;
        let policy = policy(CHAT);
        let table: &[(u32, &str, Want)] = &[
            // alice: pub and sub on chat.>
            (ALICE, "chat.room", Want::Pub(true)),
            (ALICE, "chat.private.x", Want::Pub(true)),
            (ALICE, "chat", Want::Pub(false)),
            (ALICE, "news.x", Want::Pub(false)),
            (ALICE, "_bus.x", Want::Pub(false)),
            (ALICE, "chat.>", S(Allowed)),
            (ALICE, "chat.*.x", S(Allowed)),
            (ALICE, ">", S(Partial)),
            (ALICE, "news.>", S(Denied)),
            // bob: sub only on chat.public.>
            (BOB, "chat.public.x", Want::Pub(false)),
            (BOB, "chat.public.>", S(Allowed)),
            (BOB, "chat.public.a.b", S(Allowed)),
            (BOB, "chat.>", S(Partial)),
            (BOB, "chat.*.x", S(Partial)),
            (BOB, "*.public.x", S(Partial)),
            (BOB, "chat.private.>", S(Denied)),
            (BOB, "chat.public", S(Denied)),
            // carol: nothing (default deny)
            (CAROL, "chat.x", Want::Pub(false)),
            (CAROL, "chat.>", S(Denied)),
            (CAROL, ">", S(Denied)),
            // staff (alice, dave): pub ops.*, sub ops.> but not ops.secret
            (DAVE, "ops.deploy", Want::Pub(true)),
            (DAVE, "ops.deploy.x", Want::Pub(false)),
            (DAVE, "chat.x", Want::Pub(false)),
            (DAVE, "ops.>", S(Partial)),
            (DAVE, "ops.*", S(Partial)),
            (DAVE, "ops.secret", S(Denied)),
            (DAVE, "ops.public", S(Allowed)),
            (DAVE, "ops.secret.x", S(Allowed)),
            (ALICE, "ops.secret", S(Denied)),
            (BOB, "ops.public", S(Denied)),
        ];
        for &(uid, what, want) in table {
            match want {
                Want::Pub(ok) => assert_eq!(
                    policy.may_publish(&id(uid), &t(what)),
                    ok,
                    "uid {uid} PUB {what}"
                ),
                Want::Sub(s) => assert_eq!(
                    policy.may_subscribe(&id(uid), &p(what)),
                    s,
                    "uid {uid} SUB {what}"
                ),
            }
        }
        // What a Partial subscription receives.
        assert!(policy.may_receive(&id(BOB), &t("chat.public.x")));
        assert!(!policy.may_receive(&id(BOB), &t("chat.private.y")));
        assert!(!policy.may_receive(&id(DAVE), &t("ops.secret")));
        assert!(policy.may_receive(&id(DAVE), &t("ops.other")));
    }

    #[test]
    fn limits_take_each_value_from_the_first_line_that_sets_it() {
        let policy = policy(CHAT);
        assert_eq!(
            policy.limits(&id(ALICE)),
            Limits {
                clients: Some(10),
                subscriptions: Some(1000),
                backlog: Some(16 << 20),
            }
        );
        assert_eq!(
            policy.limits(&id(BOB)),
            Limits {
                clients: Some(2),
                ..Limits::default()
            }
        );
        assert_eq!(Policy::open().limits(&id(BOB)), Limits::default());
    }

    #[test]
    fn the_open_policy_allows_everything_and_default_allow_keeps_bus_reserved() {
        let open = Policy::open();
        assert!(open.is_open());
        assert!(open.may_publish(&id(CAROL), &t("_bus.x")));
        assert_eq!(open.may_subscribe(&id(CAROL), &p(">")), Sub::Allowed);
        let allow = policy("default allow\nallow pub _bus.> all");
        assert!(!allow.is_open());
        assert!(allow.may_publish(&id(CAROL), &t("anything")));
        assert!(
            !allow.may_publish(&id(CAROL), &t("_bus.x")),
            "no rule opens _bus."
        );
        assert!(!allow.may_publish(&id(CAROL), &t("_bus")));
        assert!(allow.may_publish(&id(CAROL), &t("_busy")));
        assert_eq!(allow.rule_count(), 1);
        assert!(!policy("").default_allows(), "no default line: deny");
    }

    #[test]
    fn first_match_wins() {
        let policy =
            policy("allow pub a.> all\ndeny pub a.b all\ndeny pub c.> all\nallow pub c.d all");
        assert!(
            policy.may_publish(&id(BOB), &t("a.b")),
            "the earlier allow wins"
        );
        assert!(
            !policy.may_publish(&id(BOB), &t("c.d")),
            "the earlier deny wins"
        );
    }

    #[test]
    fn errors_name_the_line_and_say_what_to_do() {
        let cases = [
            (
                "default deny\nallow pub chat.> user=nobody_here",
                2,
                "unknown user 'nobody_here'",
            ),
            (
                "\n\nallow pub chat.> group=ghosts",
                3,
                "unknown group 'ghosts'",
            ),
            ("allow pub chat..x all", 1, "bad pattern 'chat..x'"),
            (
                "allow publish chat all",
                1,
                "'publish' is not pub, sub or pubsub",
            ),
            ("allow pub chat", 1, "the rule names nobody"),
            ("allow pub", 1, "expected 'allow pub|sub|pubsub PATTERN"),
            (
                "allow pub x uid=3",
                1,
                "'uid=3' is not user=NAME, group=NAME or all",
            ),
            (
                "default deny\n# c\ndefault allow",
                3,
                "a second 'default' line (the first is line 1)",
            ),
            (
                "default maybe",
                1,
                "expected 'default allow' or 'default deny'",
            ),
            ("permit pub x all", 1, "unknown keyword 'permit'"),
            ("limit all", 1, "the limit sets nothing"),
            (
                "limit all clients=x",
                1,
                "clients: 'x' is not a whole number",
            ),
            (
                "limit all backlog=3parsecs",
                1,
                "backlog: '3parsecs': unknown unit",
            ),
            ("limit all flights=3", 1, "unknown limit 'flights'"),
            ("limit all clients=1 clients=2", 1, "'clients' is set twice"),
        ];
        for (text, line, message) in cases {
            let e = error(text);
            let prefix = format!("acl test.acl line {line}: ");
            assert!(e.starts_with(&prefix), "{text:?}: {e}");
            assert!(e.contains(message), "{text:?}: {e}");
        }
        let e = load(Path::new("/nonexistent/fifobus.acl")).unwrap_err();
        assert_eq!(e.line, 0);
        assert!(
            e.to_string()
                .starts_with("acl /nonexistent/fifobus.acl: cannot read it:"),
            "{e}"
        );
    }

    #[test]
    fn comments_blank_lines_and_several_principals() {
        let policy = policy("  # all comment\n\nallow sub x.> user=bob user=carol # trailing\n");
        assert_eq!(policy.may_subscribe(&id(BOB), &p("x.y")), Sub::Allowed);
        assert_eq!(policy.may_subscribe(&id(CAROL), &p("x.>")), Sub::Allowed);
        assert_eq!(policy.may_subscribe(&id(ALICE), &p("x.y")), Sub::Denied);
    }

    #[test]
    fn system_names_resolve_root() {
        assert_eq!(SystemNames.uid("root"), Some(0));
        assert_eq!(SystemNames.gid("root"), Some(0));
        let root = Identity::of_uid(0);
        assert!(root.groups.contains(&0));
        assert_eq!(root.to_string(), "user root (uid 0)");
        assert_eq!(Identity::of_uid(4_000_000_000).groups, Vec::<u32>::new());
    }

    // The subscription analysis against a naive model: enumerate every
    // topic over a small alphabet and classify. Rules and patterns use
    // segments a, b, c and at most 3 segments; topics use a, b, c and d (a
    // name no rule mentions) and up to 4 segments. Longer topics, or other
    // names, decide as one of these, so the model is exact here.

    const SEGS: [&str; 4] = ["a", "b", "c", "d"];

    fn universe() -> Vec<Topic> {
        let mut out: Vec<Vec<&str>> = vec![vec![]];
        let mut all = Vec::new();
        for _ in 0..4 {
            out = out
                .iter()
                .flat_map(|prefix| {
                    SEGS.iter().map(move |s| {
                        let mut v = prefix.clone();
                        v.push(s);
                        v
                    })
                })
                .collect();
            all.extend(out.iter().map(|v| t(&v.join("."))));
        }
        all
    }

    fn pattern_strategy() -> impl Strategy<Value = Pattern> {
        let seg = prop_oneof![Just("a"), Just("b"), Just("c"), Just("*")];
        (prop::collection::vec(seg, 1..=3), any::<bool>()).prop_map(|(mut v, tail)| {
            if tail {
                *v.last_mut().unwrap() = ">";
            }
            p(&v.join("."))
        })
    }

    fn policy_strategy() -> impl Strategy<Value = String> {
        let who = prop_oneof![
            Just("all"),
            Just("user=alice"),
            Just("user=bob"),
            Just("group=staff")
        ];
        let rule = (any::<bool>(), 0..3usize, pattern_strategy(), who).prop_map(
            |(allow, action, pattern, who)| {
                let verb = if allow { "allow" } else { "deny" };
                let action = ["pub", "sub", "pubsub"][action];
                format!("{verb} {action} {pattern} {who}")
            },
        );
        (any::<bool>(), prop::collection::vec(rule, 0..6)).prop_map(|(default, rules)| {
            let d = if default {
                "default allow"
            } else {
                "default deny"
            };
            format!("{d}\n{}", rules.join("\n"))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn may_subscribe_agrees_with_enumeration(
            text in policy_strategy(),
            sub in pattern_strategy(),
            who in prop_oneof![Just(ALICE), Just(BOB), Just(CAROL)],
        ) {
            let policy = policy(&text);
            let who = id(who);
            let (mut yes, mut no) = (false, false);
            for topic in universe().iter().filter(|t| sub.matches(t)) {
                if policy.may_receive(&who, topic) { yes = true } else { no = true }
            }
            let want = match (yes, no) {
                (true, false) => Sub::Allowed,
                (false, _) => Sub::Denied,
                (true, true) => Sub::Partial,
            };
            prop_assert_eq!(policy.may_subscribe(&who, &sub), want, "{}\nSUB {}", text, sub);
        }

        #[test]
        fn may_publish_is_the_first_matching_rule(
            text in policy_strategy(),
            who in prop_oneof![Just(ALICE), Just(BOB), Just(CAROL)],
        ) {
            // The model reads the text itself: the first pub/pubsub line
            // naming `who` whose pattern matches.
            let policy = policy(&text);
            let who_id = id(who);
            let names = |w: &str| match w {
                "all" => true,
                "user=alice" => who == ALICE,
                "user=bob" => who == BOB,
                "group=staff" => who == ALICE || who == DAVE,
                _ => unreachable!(),
            };
            for topic in universe() {
                let want = text
                    .lines()
                    .skip(1)
                    .map(|l| l.split_whitespace().collect::<Vec<_>>())
                    .find(|w| w[1] != "sub" && p(w[2]).matches(&topic) && names(w[3]))
                    .map_or(text.starts_with("default allow"), |w| w[0] == "allow");
                prop_assert_eq!(policy.may_publish(&who_id, &topic), want, "{}\nPUB {}", text, topic);
            }
        }
    }
}
