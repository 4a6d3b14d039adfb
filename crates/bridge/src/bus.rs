//! The bus side: one thread holding one ordinary fifobus client (through
//! FIFOs, `fifobus::client::Client`), subscribed to the export patterns
//! with `echo=no`, so that what it publishes (the imports) never comes back
//! to it as something to export.
//!
//! One thread does both directions in order: it reads `recv` (exports, in
//! the broker's order, which is each publisher's order) and writes imports
//! to `send` in the order the NATS side queued them. The client library is
//! blocking, so this is a thread, not a task; it wakes on `recv` or on the
//! wake pipe the NATS side writes to when it queues an import.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fifobus::client::{Client, ClientError, ConnectOptions, Handshake};
use fifobus::topic::Topic;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::metrics::Metrics;
use crate::{log, Buffer};

/// One exported message: the bus topic and the payload.
pub type Export = (String, Bytes);
/// One message to publish on the bus.
pub type Import = (Topic, Bytes);

/// How often the bridge looks again for a broker that is not there (yet).
const RETRY: Duration = Duration::from_millis(250);
/// A handshake's bound.
const HANDSHAKE: Duration = Duration::from_secs(10);

pub struct BusSide {
    pub dir: PathBuf,
    pub name: String,
    pub exports: Vec<fifobus::topic::Pattern>,
    pub metrics: Arc<Metrics>,
    /// To the NATS side.
    pub export: Buffer<Export>,
    /// From the NATS side, with the pipe it writes a byte to after queuing.
    pub import: Receiver<Import>,
    pub import_buffer: Arc<crate::Bounds>,
    pub wake: OwnedFd,
    pub imports_ended: bool,
}

impl BusSide {
    /// Runs until the process ends; returns only on an error no retry can
    /// mend (the broker refuses the bridge's HELLO).
    pub fn run(mut self) -> String {
        let mut client = match self.connect(true) {
            Ok(c) => c,
            Err(e) => return e,
        };
        let mut pending: Option<Import> = None;
        loop {
            match self.turn(&mut client, &mut pending) {
                Ok(()) => {}
                Err(away) => {
                    self.metrics.bus_connected.store(0, Relaxed);
                    log(format_args!(
                        "bus: the broker on {} went away ({away}); waiting for it to come back (exports stop, imports are buffered up to the bound)",
                        self.dir.display()
                    ));
                    client = match self.resume(client) {
                        Ok(c) => c,
                        Err(e) => return e,
                    };
                    self.metrics.reconnects_bus.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// Connects, waiting for a broker as long as it takes.
    fn connect(&self, first: bool) -> Result<Client, String> {
        let opts = ConnectOptions {
            name: Some(self.name.clone()),
            pid: Some(std::process::id() as i32),
            subs: self.exports.clone(),
        };
        let guard = Handshake {
            bus_owner: None,
            // Threads: signals are the runtime's.
            catch_signals: false,
            no_echo: true,
        };
        let mut said = false;
        loop {
            match Client::connect_with(&self.dir, &opts, HANDSHAKE, &guard) {
                Ok(c) => {
                    self.metrics.bus_connected.store(1, Relaxed);
                    log(format_args!(
                        "bus: connected to the broker on {} as client {} (echo=no, exporting {})",
                        self.dir.display(),
                        c.id(),
                        if self.exports.is_empty() {
                            "nothing".to_owned()
                        } else {
                            self.exports
                                .iter()
                                .map(|p| p.as_str())
                                .collect::<Vec<_>>()
                                .join(" ")
                        }
                    ));
                    return Ok(c);
                }
                Err(e @ (ClientError::Refused { .. } | ClientError::Untrusted { .. })) => {
                    return Err(format!(
                        "the broker on {} refused the bridge: {e}",
                        self.dir.display()
                    ));
                }
                Err(e) => {
                    if !said {
                        let what = if first {
                            "waiting for a broker"
                        } else {
                            "waiting for the broker to come back"
                        };
                        log(format_args!(
                            "bus: {what} on {} ({e}); retrying every {RETRY:?}",
                            self.dir.display()
                        ));
                        said = true;
                    }
                    std::thread::sleep(RETRY);
                }
            }
        }
    }

    /// After the broker went away: the same client once a broker takes its
    /// directory back (a restart adopts it), else a new one.
    fn resume(&self, mut client: Client) -> Result<Client, String> {
        loop {
            match client.wait_for_broker(Duration::from_secs(3600)) {
                Ok(()) => {
                    self.metrics.bus_connected.store(1, Relaxed);
                    log(format_args!(
                        "bus: the broker on {} is back; client {} resumed",
                        self.dir.display(),
                        client.id()
                    ));
                    return Ok(client);
                }
                Err(ClientError::NotBack { .. }) => continue,
                Err(e) => {
                    log(format_args!("bus: cannot resume ({e}); connecting again"));
                    return self.connect(false);
                }
            }
        }
    }

    /// Reads what `recv` holds and writes what the NATS side queued;
    /// `Err` when the broker has gone.
    fn turn(&mut self, client: &mut Client, pending: &mut Option<Import>) -> Result<(), String> {
        // Imports first: a message taken but not written (the broker went
        // away mid-write) is written first once it is back.
        if let Some((t, p)) = pending.take() {
            self.publish(client, pending, t, p)?;
        }
        while !self.imports_ended {
            match self.import.try_recv() {
                Ok((t, p)) => {
                    self.import_buffer.take(p.len());
                    self.publish(client, pending, t, p)?;
                }
                Err(TryRecvError::Empty) => break,
                // No --import: nothing will come.
                Err(TryRecvError::Disconnected) => self.imports_ended = true,
            }
        }
        let mut fds = [
            PollFd::new(client.recv_fd(), PollFlags::POLLIN),
            PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
        ];
        // Once imports have ended (no --import), nobody holds the wake
        // pipe's write end: it would report POLLHUP on every poll, and
        // this loop would spin.
        let watched = if self.imports_ended { 1 } else { 2 };
        match poll(&mut fds[..watched], PollTimeout::from(1000u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        let recv_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        let woken = watched == 2 && fds[1].revents().is_some_and(|r| !r.is_empty());
        if woken {
            let mut sink = [0u8; 256];
            while matches!(nix::unistd::read(self.wake.as_raw_fd(), &mut sink), Ok(n) if n > 0) {}
        }
        if recv_ready {
            client.fill().map_err(|e| format!("reading recv: {e}"))?;
            while let Some(line) = client.buffered_line() {
                self.line(&line);
            }
            if client.at_eof() {
                return Err("recv closed".into());
            }
        }
        Ok(())
    }

    fn publish(
        &self,
        client: &mut Client,
        pending: &mut Option<Import>,
        topic: Topic,
        payload: Bytes,
    ) -> Result<(), String> {
        match client.publish(&topic, &payload) {
            Ok(()) => {
                let w = &self.metrics.import;
                w.messages.fetch_add(1, Relaxed);
                w.bytes.fetch_add(payload.len() as u64, Relaxed);
                Ok(())
            }
            Err(ClientError::Io(e)) => {
                *pending = Some((topic, payload));
                Err(format!("writing send: {e}"))
            }
            Err(e) => {
                // A payload the protocol cannot carry (a newline): this one
                // message is lost, counted.
                self.metrics
                    .import
                    .dropped_unconfirmed
                    .fetch_add(1, Relaxed);
                log(format_args!(
                    "bus: cannot publish an import on '{topic}': {e}; dropped"
                ));
                Ok(())
            }
        }
    }

    /// One line from the broker.
    fn line(&self, line: &[u8]) {
        if let Some(rest) = line.strip_prefix(b"MSG ") {
            let (topic, payload) = match memchr_space(rest) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &b""[..]),
            };
            let topic = String::from_utf8_lossy(topic).into_owned();
            let payload = Bytes::copy_from_slice(payload);
            self.export.push((topic, payload), payload_len_of);
        } else if let Some(n) = line.strip_prefix(b"DROPPED ") {
            let text = String::from_utf8_lossy(n);
            match text.split(' ').next().and_then(|n| n.parse::<u64>().ok()) {
                Some(n) => {
                    self.metrics.export.dropped_broker.fetch_add(n, Relaxed);
                    log(format_args!(
                        "DROPPED {n} export: the broker dropped lines for the bridge (it did not read fast enough; NATS slow or --buffer full)"
                    ));
                }
                None => log(format_args!(
                    "bus: the broker says DROPPED {text}: exports published while no broker ran may be lost"
                )),
            }
        } else if line.starts_with(b"ERR ") {
            log(format_args!(
                "bus: the broker answered {}",
                String::from_utf8_lossy(line)
            ));
        }
    }
}

fn payload_len_of(e: &Export) -> usize {
    e.1.len()
}

fn memchr_space(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b' ')
}
