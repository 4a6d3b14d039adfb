//! The broker's own topics, under `_bus.`: presence events it publishes,
//! and the requests it answers itself (`fifobus ls`).
//!
//! Only the broker publishes there, so a subscriber to `_bus.client.>` can
//! trust that every event is real. Presence payloads are `key=value` words,
//! like `HELLO` (a shell splits them with `for kv in $payload`); the `ls`
//! answers are one line of JSON, since they nest.

use std::time::Instant;

use bytes::Bytes;
use serde_json::json;

use super::requests::no_responders;
use super::{ClientKey, RouterCore};
use crate::protocol::ProtocolError;
use crate::topic::Topic;

/// Topics whose first segment is this belong to the broker (the ACL
/// keeps the same segment reserved).
pub const BUS_SEGMENT: &str = crate::acl::RESERVED_PREFIX;
/// `BUS_SEGMENT` and its dot: what a bus topic starts with.
pub const BUS_PREFIX: &str = "_bus.";

/// Who a client is, as presence events and `fifobus ls` tell it.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub uuid: String,
    pub name: Option<String>,
    pub pid: Option<i32>,
    pub uid: u32,
    pub since: Instant,
}

/// Whether `topic` is the broker's own (`_bus` or under `_bus.`). Asked
/// of every `PUB`: a byte compare, no segment split.
pub fn is_bus_topic(topic: &Topic) -> bool {
    topic
        .as_bytes()
        .strip_prefix(BUS_SEGMENT.as_bytes())
        .is_some_and(|rest| rest.is_empty() || rest[0] == b'.')
}

impl ClientInfo {
    /// `uuid=<u> [name=<n>] [pid=<p>] uid=<uid>`: the words of a presence
    /// event. Names cannot hold spaces or `=` (the HELLO parser refuses
    /// them), so each word splits at its first `=`.
    fn words(&self) -> String {
        let mut s = format!("uuid={}", self.uuid);
        if let Some(n) = &self.name {
            s.push_str(&format!(" name={n}"));
        }
        if let Some(p) = self.pid {
            s.push_str(&format!(" pid={p}"));
        }
        s.push_str(&format!(" uid={}", self.uid));
        s
    }
}

impl RouterCore {
    /// Client `key` was just attached (its `sub=` in force): remember who
    /// it is and publish `_bus.client.joined`.
    pub fn joined(&mut self, key: ClientKey, info: ClientInfo) {
        let Some(c) = self.clients.get_mut(&key) else {
            return;
        };
        let payload = Bytes::from(info.words());
        c.info = Some(info);
        self.publish_bus("_bus.client.joined", &payload);
    }

    /// Forgets client `key`, publishing `_bus.client.left` with `reason`
    /// if it had joined. Idempotent, like [`RouterCore::detach`].
    pub fn leave(&mut self, key: ClientKey, reason: &str) {
        let info = self.clients.get_mut(&key).and_then(|c| c.info.take());
        self.detach(key);
        if let Some(info) = info {
            let payload = Bytes::from(format!("{} reason={reason}", info.words()));
            self.publish_bus("_bus.client.left", &payload);
        }
    }

    /// Delivers one of the broker's own messages. Only to patterns that
    /// name `_bus` as their first segment: as `#` in MQTT does not match
    /// `$SYS`, a subscriber to `>` or `*.client.>` asked for the clients'
    /// traffic, not the broker's, and gets none of it. Not counted as
    /// published: the metrics and `ls topics` show what clients send.
    /// Rare (a join or a leave), so matched each time, outside the cache.
    fn publish_bus(&mut self, topic: &'static str, payload: &Bytes) {
        let topic = Topic::parse(topic.as_bytes()).expect("a valid topic");
        let mut keys = std::mem::take(&mut self.scratch);
        self.index.matches(&topic, &mut keys);
        let open = self.policy.is_open();
        let mut line = None;
        for k in &keys {
            let Some(c) = self.clients.get(k) else {
                continue;
            };
            let asked = c
                .patterns
                .iter()
                .any(|p| p.segments().next() == Some(BUS_SEGMENT) && p.matches(&topic));
            if asked && (open || self.policy.may_receive(&c.who, &topic)) {
                let line =
                    line.get_or_insert_with(|| crate::protocol::encode::msg(&topic, payload));
                c.outbox.push(line.clone());
            }
        }
        self.scratch = keys;
    }

    /// A `REQ` on a `_bus.` topic, answered by the broker itself.
    pub(super) fn bus_request(
        &mut self,
        _key: ClientKey,
        topic: &Topic,
    ) -> Result<Bytes, ProtocolError> {
        let body = match topic.as_str() {
            "_bus.ls.clients" => self.ls_clients(),
            "_bus.ls.topics" => self.ls_topics(),
            _ => return Err(no_responders(topic.as_bytes())),
        };
        Ok(Bytes::from(body.to_string()))
    }

    fn ls_clients(&self) -> serde_json::Value {
        let now = Instant::now();
        let mut rows: Vec<_> = self
            .clients
            .iter()
            .filter_map(|(&key, c)| Some((key, c, c.info.as_ref()?)))
            .collect();
        rows.sort_by_key(|(_, _, info)| info.since);
        let rows: Vec<_> = rows
            .into_iter()
            .map(|(key, c, info)| {
                let (lines, bytes) = c.outbox.backlog();
                let mut subs: Vec<&str> = c.patterns.iter().map(|p| p.as_str()).collect();
                subs.sort_unstable();
                let mut serves: Vec<&str> = self.serves_of(key).map(|p| p.as_str()).collect();
                serves.sort_unstable();
                json!({
                    "name": info.name,
                    "uuid": info.uuid,
                    "pid": info.pid,
                    "uid": info.uid,
                    "subscriptions": subs,
                    "serves": serves,
                    "backlog_lines": lines,
                    "backlog_bytes": bytes,
                    "age_secs": now.duration_since(info.since).as_secs(),
                })
            })
            .collect();
        json!(rows)
    }

    /// Every subscribed pattern with its subscriber and responder counts,
    /// and every topic published so far that has counters of its own
    /// (`--metrics-topic-limit` bounds them) with how many clients it
    /// reaches now.
    fn ls_topics(&mut self) -> serde_json::Value {
        let mut patterns: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
        for (&key, c) in &self.clients {
            for p in &c.patterns {
                patterns.entry(p.as_str()).or_default().0 += 1;
            }
            for p in self.serves_of(key) {
                patterns.entry(p.as_str()).or_default().1 += 1;
            }
        }
        let patterns: Vec<_> = patterns
            .into_iter()
            .map(|(p, (subs, serves))| json!({"pattern": p, "subscribers": subs, "responders": serves}))
            .collect();
        let mut names: Vec<Topic> = self.topics.keys().cloned().collect();
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        let mut topics = Vec::new();
        let mut scratch = Vec::new();
        for t in names {
            self.index.matches(&t, &mut scratch);
            let published = self.topics[&t]
                .published
                .load(std::sync::atomic::Ordering::Relaxed);
            let responders = self.responder_count(&t);
            topics.push(json!({
                "topic": t.as_str(),
                "subscribers": scratch.len(),
                "published": published,
                "responders": responders,
            }));
        }
        json!({"patterns": patterns, "topics": topics})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_topics_are_the_bus_segment_and_under_it_only() {
        for (t, bus) in [
            ("_bus", true),
            ("_bus.client.joined", true),
            ("_busy", false),
            ("_bus_x.y", false),
            ("a._bus", false),
            ("bus", false),
        ] {
            assert_eq!(is_bus_topic(&t.parse().unwrap()), bus, "{t}");
        }
    }
}
