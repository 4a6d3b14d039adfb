//! Request/reply, in the router: `REQ`, `SERVE`/`UNSERVE` and `REPLY`.
//!
//! A request is routed like a message, but only to clients that said
//! `SERVE` for its topic (a plain subscriber never sees a `REQUEST` line it
//! did not ask for), each getting `REQUEST <handle> <topic> <payload>`. The
//! broker remembers, per handle, who asked (and with what id) and whom it
//! asked; the first `REPLY <handle>` from one of those goes back to the
//! requester as `REPLY <id> <payload>`, and later ones are ignored.
//!
//! What a client can make the broker hold is bounded: its pending requests
//! ([`MAX_PENDING_REQUESTS`], the oldest forgotten beyond it), its `SERVE`
//! patterns (`--max-subscriptions`, as for `SUB`), and an id's length
//! ([`crate::protocol::command::MAX_ID_LEN`]). Payloads are not held here:
//! they are encoded into the responders' outboxes, under their backlog
//! limits and the memory budget.

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;

use super::{forbidden, too_many_for_client, ClientKey, FastMap, RouterCore};
use crate::acl::Sub;
use crate::protocol::{encode, ErrorCode, ProtocolError};
use crate::topic::{Pattern, PatternIndex, Topic};

/// Requests one client may wait on at once. A client that gives up on a
/// request (its own timeout) has no way to say so; the oldest is
/// forgotten when it asks once more, so a long-lived requester never
/// wedges, and a flood of requests holds at most this many entries.
pub const MAX_PENDING_REQUESTS: usize = 1024;

/// One request waiting for its first answer.
struct Pending {
    requester: ClientKey,
    id: Bytes,
    /// The clients it was delivered to: only they may answer it.
    responders: Vec<ClientKey>,
}

/// The router's request state.
pub(super) struct Requests {
    /// `SERVE` patterns; apart from subscriptions so that `MSG` routing is
    /// untouched by them.
    responders: PatternIndex<ClientKey>,
    pending: FastMap<u64, Pending>,
    /// The next handle to give; handles below it were given once.
    next_handle: u64,
    max_pending: usize,
    scratch: Vec<ClientKey>,
}

impl Default for Requests {
    fn default() -> Self {
        Requests {
            responders: PatternIndex::default(),
            pending: FastMap::default(),
            next_handle: 1,
            max_pending: MAX_PENDING_REQUESTS,
            scratch: Vec::new(),
        }
    }
}

/// One client's part in requests.
#[derive(Default)]
pub(super) struct ClientRequests {
    serves: HashSet<Pattern>,
    /// Its pending requests, oldest first.
    asked: VecDeque<u64>,
    /// Pending requests delivered to it.
    answering: HashSet<u64>,
}

impl RouterCore {
    /// Sets how many requests one client may wait on at once.
    pub fn set_max_pending_requests(&mut self, max: usize) {
        self.requests.max_pending = max.max(1);
    }

    /// Requests waiting for an answer, all clients together.
    pub fn pending_requests(&self) -> usize {
        self.requests.pending.len()
    }

    /// `REQ <id> <topic> <payload>` from client `key`.
    pub(super) fn request(&mut self, key: ClientKey, id: Bytes, topic: &Topic, payload: &[u8]) {
        let Some(client) = self.clients.get(&key) else {
            return;
        };
        let open = self.policy.is_open();
        if super::is_bus_topic(topic) {
            // Who is on the bus is for those the ACL lets receive it.
            if !open && !self.policy.may_receive(&client.who, topic) {
                self.refuse(key, forbidden(topic));
                return;
            }
            let answer = self.bus_request(key, topic);
            self.answer_now(key, &id, answer);
            return;
        }
        if !open && !self.policy.may_publish(&client.who, topic) {
            self.refuse(key, forbidden(topic));
            return;
        }
        let r = &mut self.requests;
        r.responders.matches(topic, &mut r.scratch);
        let policy = &self.policy;
        let clients = &self.clients;
        r.scratch.retain(|k| {
            clients
                .get(k)
                .is_some_and(|c| open || policy.may_receive(&c.who, topic))
        });
        if r.scratch.is_empty() {
            self.refuse(key, no_responders(&id));
            return;
        }
        // Full: forget the oldest, telling the requester which.
        let asked = self.clients.get(&key).map_or(0, |c| c.req.asked.len());
        if asked >= self.requests.max_pending {
            let oldest = self
                .clients
                .get_mut(&key)
                .and_then(|c| c.req.asked.pop_front());
            if let Some(p) = oldest.and_then(|h| self.finish(h)) {
                self.refuse(key, too_many_requests(&p.id, self.requests.max_pending));
            }
        }
        let r = &mut self.requests;
        let handle = r.next_handle;
        r.next_handle += 1;
        let line = encode::request(handle.to_string().as_bytes(), topic.as_bytes(), payload);
        let responders = std::mem::take(&mut r.scratch);
        for k in &responders {
            if let Some(c) = self.clients.get_mut(k) {
                c.outbox.push(line.clone());
                c.req.answering.insert(handle);
            }
        }
        if let Some(c) = self.clients.get_mut(&key) {
            c.req.asked.push_back(handle);
        }
        self.requests.pending.insert(
            handle,
            Pending {
                requester: key,
                id,
                responders,
            },
        );
    }

    /// `REPLY <handle> <payload>` from client `key`. The first answer from
    /// a client the request reached goes to the requester; an answer to a
    /// request already answered (or whose requester left) is dropped
    /// quietly, as it is no mistake; a handle never given to this client is
    /// `ERR unknown-request`.
    pub(super) fn respond(&mut self, key: ClientKey, handle: &[u8], payload: &[u8]) {
        let parsed = std::str::from_utf8(handle)
            .ok()
            .and_then(|h| h.parse::<u64>().ok())
            .filter(|&h| h > 0 && h < self.requests.next_handle);
        let Some(h) = parsed else {
            self.refuse(key, unknown_request(handle));
            return;
        };
        match self.requests.pending.get(&h) {
            Some(p) if p.responders.contains(&key) => {
                let p = self.finish(h).expect("pending");
                if let Some(c) = self.clients.get(&p.requester) {
                    c.outbox.push(encode::answer(&p.id, payload));
                }
            }
            Some(_) => self.refuse(key, unknown_request(handle)),
            None => {}
        }
    }

    /// `SERVE <pattern>`: under the same per-client limit and ACL rule as
    /// `SUB` (receiving requests on a topic is receiving from it).
    pub(super) fn serve(&mut self, key: ClientKey, p: Pattern) {
        let Some(client) = self.clients.get(&key) else {
            return;
        };
        if client.req.serves.contains(&p) {
            return;
        }
        if client.req.serves.len() >= self.max_subscriptions {
            self.refuse(key, too_many_for_client(self.max_subscriptions));
            return;
        }
        if !self.policy.is_open() && self.policy.may_subscribe(&client.who, &p) == Sub::Denied {
            self.refuse(key, forbidden(&p));
            return;
        }
        let p = p.detached();
        self.requests.responders.insert(&p, key);
        if let Some(c) = self.clients.get_mut(&key) {
            c.req.serves.insert(p);
        }
    }

    /// `UNSERVE <pattern>`. Requests already delivered may still be answered.
    pub(super) fn unserve(&mut self, key: ClientKey, p: &Pattern) {
        if let Some(c) = self.clients.get_mut(&key) {
            if c.req.serves.remove(p) {
                self.requests.responders.remove(p, key);
            }
        }
    }

    /// A client left (already removed from `clients`): its `SERVE`
    /// patterns go, its own requests are forgotten, and a request it was
    /// the last one able to answer gets `ERR no-responders <id>`.
    pub(super) fn forget_requests(&mut self, key: ClientKey, req: ClientRequests) {
        for p in &req.serves {
            self.requests.responders.remove(p, key);
        }
        for h in req.asked {
            self.finish(h);
        }
        for h in req.answering {
            let Some(p) = self.requests.pending.get_mut(&h) else {
                continue;
            };
            p.responders.retain(|&k| k != key);
            if p.responders.is_empty() {
                let p = self.finish(h).expect("pending");
                self.refuse(p.requester, no_responders(&p.id));
            }
        }
    }

    /// Removes pending request `h` and every reference to it.
    fn finish(&mut self, h: u64) -> Option<Pending> {
        let p = self.requests.pending.remove(&h)?;
        for k in &p.responders {
            if let Some(c) = self.clients.get_mut(k) {
                c.req.answering.remove(&h);
            }
        }
        if let Some(c) = self.clients.get_mut(&p.requester) {
            if let Some(i) = c.req.asked.iter().position(|&x| x == h) {
                c.req.asked.remove(i);
            }
        }
        Some(p)
    }

    /// Answers a request the broker serves itself.
    fn answer_now(&mut self, key: ClientKey, id: &[u8], answer: Result<Bytes, ProtocolError>) {
        match answer {
            Ok(payload) => {
                if let Some(c) = self.clients.get(&key) {
                    c.outbox.push(encode::answer(id, &payload));
                }
            }
            Err(e) => self.refuse(key, e),
        }
    }

    /// `ERR` to client `key`, counted.
    pub(super) fn refuse(&self, key: ClientKey, e: ProtocolError) {
        self.counters.protocol_error(e.code);
        if let Some(c) = self.clients.get(&key) {
            c.outbox.push(encode::err(&e));
        }
    }

    /// The `SERVE` patterns of client `key`, for `fifobus ls`.
    pub(super) fn serves_of(&self, key: ClientKey) -> impl Iterator<Item = &Pattern> {
        self.clients
            .get(&key)
            .into_iter()
            .flat_map(|c| c.req.serves.iter())
    }

    /// How many clients serve requests on `topic`.
    pub(super) fn responder_count(&mut self, topic: &Topic) -> usize {
        let r = &mut self.requests;
        r.responders.matches(topic, &mut r.scratch);
        r.scratch.len()
    }
}

/// `ERR no-responders <id>`: the text is exactly the request's id.
pub(super) fn no_responders(id: &[u8]) -> ProtocolError {
    ProtocolError::new(ErrorCode::NoResponders, String::from_utf8_lossy(id))
}

fn too_many_requests(id: &[u8], max: usize) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::TooManyRequests,
        format!(
            "{} (forgotten: a client may wait on at most {max} requests; its answer will not come)",
            String::from_utf8_lossy(id)
        ),
    )
}

fn unknown_request(handle: &[u8]) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::UnknownRequest,
        format!(
            "{} (no request with this handle was given to you; answer REQUEST lines with their handle)",
            crate::protocol::escape_for_display(handle, 80)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::Counters;
    use crate::protocol::Command;
    use crate::router::outbox::{BacklogLimits, Outbox};
    use std::sync::Arc;
    use std::time::Instant;

    fn cmd(core: &mut RouterCore, key: ClientKey, s: &str) {
        let c = Command::parse(Bytes::copy_from_slice(s.as_bytes())).map(|c| c.expect("not blank"));
        core.apply(key, c, Instant::now());
    }

    fn client(core: &mut RouterCore, key: ClientKey, subs: &[&str]) -> Arc<Outbox> {
        let o = Arc::new(Outbox::new(BacklogLimits::default()));
        core.attach(
            key,
            o.clone(),
            subs.iter().map(|s| s.parse().unwrap()).collect(),
        );
        o
    }

    fn lines(o: &Outbox) -> Vec<String> {
        let mut q = crate::router::outbox::Batch::default();
        o.take(&mut q);
        let got = q
            .lines()
            .map(|l| String::from_utf8_lossy(l).trim_end().to_string())
            .collect();
        let (b, n) = q.clear();
        o.written(b, n);
        got
    }

    #[test]
    fn a_request_reaches_responders_only_and_the_first_answer_wins() {
        let mut core = RouterCore::new(Counters::new(100));
        let asker = client(&mut core, 1, &[]);
        let a = client(&mut core, 2, &[]);
        let b = client(&mut core, 3, &[]);
        let plain = client(&mut core, 4, &["svc.>"]);
        cmd(&mut core, 2, "SERVE svc.*");
        cmd(&mut core, 3, "SERVE svc.echo");
        cmd(&mut core, 1, "REQ q1 svc.echo hi there");
        assert_eq!(lines(&a), ["REQUEST 1 svc.echo hi there"]);
        assert_eq!(lines(&b), ["REQUEST 1 svc.echo hi there"]);
        assert!(lines(&plain).is_empty(), "a plain subscriber got a request");
        cmd(&mut core, 3, "REPLY 1 HI THERE");
        cmd(&mut core, 2, "REPLY 1 late");
        assert_eq!(lines(&asker), ["REPLY q1 HI THERE"]);
        assert!(lines(&a).is_empty(), "a late answer is not an error");
        assert_eq!(core.pending_requests(), 0);
    }

    #[test]
    fn no_responders_is_answered_at_once() {
        let mut core = RouterCore::new(Counters::new(100));
        let asker = client(&mut core, 1, &[]);
        client(&mut core, 2, &["svc.echo"]);
        cmd(&mut core, 1, "REQ q1 svc.echo hi");
        assert_eq!(lines(&asker), ["ERR no-responders q1"]);
        assert_eq!(core.pending_requests(), 0);
    }

    #[test]
    fn pending_requests_per_client_are_bounded_oldest_forgotten() {
        let mut core = RouterCore::new(Counters::new(100));
        core.set_max_pending_requests(3);
        let asker = client(&mut core, 1, &[]);
        let r = client(&mut core, 2, &[]);
        cmd(&mut core, 2, "SERVE t");
        for i in 1..=5 {
            cmd(&mut core, 1, &format!("REQ q{i} t x"));
        }
        assert_eq!(core.pending_requests(), 3);
        let got = lines(&asker);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("ERR too-many-requests q1 "), "{got:?}");
        assert!(got[1].starts_with("ERR too-many-requests q2 "), "{got:?}");
        assert_eq!(lines(&r).len(), 5);
        // The forgotten one cannot be answered any more; the kept ones can.
        cmd(&mut core, 2, "REPLY 1 a");
        cmd(&mut core, 2, "REPLY 5 e");
        assert_eq!(lines(&asker), ["REPLY q5 e"]);
    }

    #[test]
    fn only_a_client_the_request_reached_may_answer_it() {
        let mut core = RouterCore::new(Counters::new(100));
        let asker = client(&mut core, 1, &[]);
        client(&mut core, 2, &[]);
        let forger = client(&mut core, 3, &[]);
        cmd(&mut core, 2, "SERVE t");
        cmd(&mut core, 1, "REQ q1 t x");
        cmd(&mut core, 3, "REPLY 1 forged");
        cmd(&mut core, 3, "REPLY 99 never-given");
        cmd(&mut core, 3, "REPLY abc x");
        let got = lines(&forger);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(
            got.iter().all(|l| l.starts_with("ERR unknown-request ")),
            "{got:?}"
        );
        assert!(lines(&asker).is_empty());
        assert_eq!(core.pending_requests(), 1);
    }

    #[test]
    fn leaving_ends_what_a_client_asked_and_what_it_was_asked() {
        let mut core = RouterCore::new(Counters::new(100));
        let asker = client(&mut core, 1, &[]);
        client(&mut core, 2, &[]);
        client(&mut core, 3, &[]);
        cmd(&mut core, 2, "SERVE t");
        cmd(&mut core, 3, "SERVE t");
        cmd(&mut core, 1, "REQ q1 t x");
        core.detach(2);
        assert!(lines(&asker).is_empty(), "3 may still answer");
        core.detach(3);
        assert_eq!(lines(&asker), ["ERR no-responders q1"]);
        assert_eq!(core.pending_requests(), 0);
        // And with no SERVE left, the next one fails at once.
        cmd(&mut core, 1, "REQ q2 t x");
        assert_eq!(lines(&asker), ["ERR no-responders q2"]);
        let r = client(&mut core, 4, &[]);
        cmd(&mut core, 4, "SERVE t");
        cmd(&mut core, 1, "REQ q3 t x");
        core.detach(1);
        assert_eq!(core.pending_requests(), 0);
        // q2 took no handle: q3 is the second.
        cmd(&mut core, 4, "REPLY 2 x");
        assert_eq!(lines(&r), ["REQUEST 2 t x"], "a late answer costs nothing");
    }

    #[test]
    fn serve_patterns_count_against_max_subscriptions() {
        let mut core = RouterCore::new(Counters::new(100));
        core.set_max_subscriptions(2);
        let r = client(&mut core, 1, &[]);
        cmd(&mut core, 1, "SERVE a");
        cmd(&mut core, 1, "SERVE b");
        cmd(&mut core, 1, "SERVE a");
        assert!(lines(&r).is_empty());
        cmd(&mut core, 1, "SERVE c");
        let got = lines(&r);
        assert_eq!(got.len(), 1);
        assert!(got[0].starts_with("ERR too-many-subscriptions "), "{got:?}");
        cmd(&mut core, 1, "UNSERVE a");
        cmd(&mut core, 1, "SERVE c");
        assert!(lines(&r).is_empty());
    }

    #[test]
    fn only_the_broker_publishes_under_bus_and_it_announces_clients() {
        use crate::router::core::ClientInfo;
        let mut core = RouterCore::new(Counters::new(100));
        let watcher = client(&mut core, 1, &["_bus.client.>"]);
        cmd(&mut core, 1, "PUB _bus.client.joined uuid=fake");
        cmd(&mut core, 1, "PUB _bus x");
        cmd(&mut core, 1, "PUB _busy.x fine");
        assert_eq!(
            lines(&watcher),
            ["ERR forbidden _bus.client.joined", "ERR forbidden _bus"]
        );
        // A pattern that does not name _bus first gets none of it.
        let everything = client(&mut core, 3, &[">", "*.client.>"]);
        client(&mut core, 2, &[]);
        let info = ClientInfo {
            uuid: "u-2".into(),
            name: Some("worker".into()),
            pid: Some(42),
            uid: 1000,
            since: Instant::now(),
        };
        core.joined(2, info);
        cmd(&mut core, 2, "BYE");
        core.leave(2, "shutdown");
        assert_eq!(
            lines(&watcher),
            [
                "MSG _bus.client.joined uuid=u-2 name=worker pid=42 uid=1000",
                "MSG _bus.client.left uuid=u-2 name=worker pid=42 uid=1000 reason=bye",
            ]
        );
        assert!(lines(&everything).is_empty());
    }
}
