//! Topic <-> subject mapping, checked once at start.
//!
//! NATS subjects and fifobus topics share `.`, `*` and `>`, so the mapping
//! is the identity, plus an optional prefix on the way out (`--prefix`)
//! and an optional prefix taken off on the way in (`--import-strip`).
//! Everything that could fail at run time for every message (a pattern the
//! bus would refuse) is refused here instead, with the flag named.

use fifobus::topic::{Pattern, Topic};

#[derive(Debug, Clone)]
pub struct Mapping {
    /// `--prefix`: exported topic `T` becomes subject `<prefix>.T`.
    pub prefix: Option<String>,
    /// `--import-strip`: subject `<strip>.T` becomes bus topic `T`.
    pub strip: Option<String>,
    pub exports: Vec<Pattern>,
    /// The NATS subject patterns subscribed to.
    pub imports: Vec<String>,
}

impl Mapping {
    /// # Errors
    /// A line naming the flag and the value that cannot work, and why.
    pub fn new(
        prefix: Option<String>,
        strip: Option<String>,
        exports: &[String],
        imports: &[String],
    ) -> Result<Mapping, String> {
        for (flag, p) in [("--prefix", &prefix), ("--import-strip", &strip)] {
            if let Some(p) = p {
                Topic::parse(p.as_bytes()).map_err(|e| {
                    format!("{flag} '{p}' is not a valid topic prefix ({e}): use words separated by '.', without '*' or '>'")
                })?;
            }
        }
        let exports = exports
            .iter()
            .map(|e| {
                let p = Pattern::parse(e.as_bytes())
                    .map_err(|err| format!("--export '{e}' is not a valid fifobus pattern: {err}"))?;
                if let Some(prefix) = &prefix {
                    Pattern::parse(format!("{prefix}.{e}").as_bytes()).map_err(|err| {
                        format!("--export '{e}' with --prefix '{prefix}' gives no valid subject pattern: {err}")
                    })?;
                }
                Ok(p)
            })
            .collect::<Result<Vec<_>, String>>()?;
        for i in imports {
            // The subject becomes a topic on the bus: a NATS subject pattern
            // the bus could not hold is refused before anything connects.
            Pattern::parse(i.as_bytes()).map_err(|err| {
                format!("--import '{i}' is a NATS subject pattern that is not a valid fifobus pattern ({err}); fifobus topics are words of A-Z a-z 0-9 _ : - separated by '.' (docs/protocol.md, \"Topics and patterns\")")
            })?;
            if let Some(s) = &strip {
                let rest = i.strip_prefix(s.as_str()).and_then(|r| r.strip_prefix('.'));
                match rest {
                    Some(r) => {
                        Pattern::parse(r.as_bytes()).map_err(|err| {
                            format!("--import '{i}' without --import-strip '{s}' is '{r}', not a valid fifobus pattern: {err}")
                        })?;
                    }
                    None => {
                        return Err(format!(
                            "--import '{i}' does not start with --import-strip '{s}.': every imported subject must carry the prefix that is taken off"
                        ))
                    }
                }
            }
        }
        Ok(Mapping {
            prefix,
            strip,
            exports,
            imports: imports.to_vec(),
        })
    }

    /// The NATS subject of bus topic `topic`.
    pub fn subject(&self, topic: &str) -> String {
        match &self.prefix {
            Some(p) => format!("{p}.{topic}"),
            None => topic.to_owned(),
        }
    }

    /// The bus topic of NATS subject `subject`, or why it cannot be one.
    pub fn topic(&self, subject: &str) -> Result<Topic, String> {
        let t = match &self.strip {
            Some(s) => subject
                .strip_prefix(s.as_str())
                .and_then(|r| r.strip_prefix('.'))
                .unwrap_or(subject),
            None => subject,
        };
        Topic::parse(t.as_bytes())
            .map(|t| t.detached())
            .map_err(|e| format!("subject '{subject}' is not a fifobus topic: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn prefix_and_strip_map_both_ways() {
        let m = Mapping::new(
            Some("site-a".into()),
            Some("site-b".into()),
            &s(&["chat.>"]),
            &s(&["site-b.>"]),
        )
        .unwrap();
        assert_eq!(m.subject("chat.room"), "site-a.chat.room");
        assert_eq!(m.topic("site-b.chat.room").unwrap().as_str(), "chat.room");
        let plain = Mapping::new(None, None, &s(&["a.*"]), &s(&["b.>"])).unwrap();
        assert_eq!(plain.subject("a.x"), "a.x");
        assert_eq!(plain.topic("b.y").unwrap().as_str(), "b.y");
    }

    #[test]
    fn what_cannot_work_is_refused_at_start_naming_the_flag() {
        for (prefix, strip, ex, im, flag) in [
            (Some("a.*"), None, vec!["x"], vec![], "--prefix"),
            (None, Some("b.>"), vec![], vec!["b.>"], "--import-strip"),
            (None, None, vec!["a..b"], vec![], "--export"),
            (None, None, vec![], vec!["a b"], "--import"),
            (None, None, vec![], vec!["a.>.b"], "--import"),
            (None, Some("site"), vec![], vec!["other.>"], "--import"),
        ] {
            let e = Mapping::new(
                prefix.map(str::to_owned),
                strip.map(str::to_owned),
                &s(&ex),
                &s(&im),
            )
            .unwrap_err();
            assert!(e.starts_with(flag), "{e}");
        }
    }

    #[test]
    fn a_subject_that_is_no_topic_is_an_error_not_a_panic() {
        let m = Mapping::new(None, None, &[], &s(&[">"])).unwrap();
        assert!(m.topic("a..b").is_err());
        assert!(m.topic("").is_err());
    }
}
