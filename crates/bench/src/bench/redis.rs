//! `--only redis`: 1 -> 10 pub/sub through a redis-server started for the
//! run, beside fifobus' 1 -> 10 in the same run (issue 14, item 3), with
//! small std-only RESP clients over redis' unix socket: one publisher
//! pipelining PUBLISH, ten SUBSCRIBE readers. The figure compared is the
//! server's CPU per delivery, from `/proc/PID/stat` of each server.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{BenchError, Result, SCENARIO_LIMIT};

/// The length of the first complete RESP (v2) frame in `buf`, or None if
/// `buf` does not yet hold a whole one. Push frames (`>`, RESP3) are read
/// as arrays.
///
/// # Errors
/// A type byte RESP does not have, or a length that is not a number: the
/// stream is not RESP, and reading on would only misframe.
pub(crate) fn frame_len(buf: &[u8]) -> io::Result<Option<usize>> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let Some(eol) = memchr::memmem::find(buf, b"\r\n") else {
        return Ok(None);
    };
    let header = eol + 2;
    let number = || -> io::Result<i64> {
        std::str::from_utf8(&buf[1..eol])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                bad(format!(
                    "a RESP length that is not a number: {:?}",
                    &buf[..eol]
                ))
            })
    };
    match kind {
        b'+' | b'-' | b':' => Ok(Some(header)),
        b'$' => {
            let len = number()?;
            if len < 0 {
                return Ok(Some(header));
            }
            let end = header + len as usize + 2;
            Ok((buf.len() >= end).then_some(end))
        }
        b'*' | b'>' => {
            let count = number()?;
            let mut at = header;
            for _ in 0..count.max(0) {
                match frame_len(&buf[at..])? {
                    Some(k) => at += k,
                    None => return Ok(None),
                }
            }
            Ok(Some(at))
        }
        other => Err(bad(format!("a RESP frame starting with byte {other:#04x}"))),
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Appends a command as a RESP array of bulk strings.
pub(crate) fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    let _ = write!(out, "*{}\r\n", args.len());
    for a in args {
        let _ = write!(out, "${}\r\n", a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Complete frames out of a byte stream.
#[derive(Default)]
pub(crate) struct Frames {
    buf: Vec<u8>,
}

impl Frames {
    /// Appends `data` and calls `each` for every frame it completes.
    pub(crate) fn feed(&mut self, data: &[u8], mut each: impl FnMut(&[u8])) -> io::Result<()> {
        self.buf.extend_from_slice(data);
        let mut at = 0;
        while let Some(k) = frame_len(&self.buf[at..])? {
            each(&self.buf[at..at + k]);
            at += k;
        }
        self.buf.drain(..at);
        Ok(())
    }
}

/// Reads frames from `s` until `n` have come; calls `each` on each.
fn read_frames(s: &mut UnixStream, n: u64, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let mut frames = Frames::default();
    let mut buf = vec![0u8; 256 * 1024];
    let mut seen = 0u64;
    while seen < n {
        let k = s.read(&mut buf)?;
        if k == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("redis-server closed the connection after {seen} of {n} replies"),
            ));
        }
        frames.feed(&buf[..k], |f| {
            seen += 1;
            each(f);
        })?;
    }
    Ok(())
}

/// A redis-server of our own on a unix socket in a scratch directory, no
/// TCP port, no persistence; killed by its pid on drop.
pub(super) struct RedisServer {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts `redis-server` from PATH, or None if there is none.
    pub(super) fn start() -> Result<Option<RedisServer>> {
        let dir = super::scratch_dir()?;
        let socket = dir.path().join("redis.sock");
        let spawned = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--daemonize", "no", "--dir"])
            .arg(dir.path())
            // Subscribers that fall behind for a moment must not be cut
            // off: the fifobus brokers get an unbounded backlog too.
            .args(["--client-output-buffer-limit", "pubsub 0 0 0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(BenchError::Failed(format!(
                    "cannot start redis-server: {e}"
                )))
            }
        };
        let mut server = RedisServer {
            child,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = server.connect() {
                let mut ping = Vec::new();
                encode_command(&mut ping, &[b"PING"]);
                s.write_all(&ping)?;
                read_frames(&mut s, 1, |_| {})?;
                return Ok(Some(server));
            }
            if let Some(status) = server.child.try_wait()? {
                return Err(BenchError::Failed(format!(
                    "redis-server exited at start ({status}); run it by hand with the same arguments to see why"
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Failed(format!(
                    "redis-server did not listen on {} within 10 s",
                    server.socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub(super) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn connect(&self) -> io::Result<UnixStream> {
        let s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(SCENARIO_LIMIT))?;
        Ok(s)
    }

    fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One publisher pipelines `n` PUBLISH of `payload`-byte messages on one
/// channel to `subscribers` subscribers. Returns deliveries per second and
/// the server's CPU nanoseconds per delivery, over the stream only.
pub(super) fn one_to_n(
    server: &RedisServer,
    subscribers: usize,
    n: u64,
    payload: usize,
) -> Result<super::Fanned> {
    const CHANNEL: &[u8] = b"bench.t0";
    let (tx, rx) = mpsc::channel();
    for _ in 0..subscribers {
        let mut s = server.connect()?;
        let mut sub = Vec::new();
        encode_command(&mut sub, &[b"SUBSCRIBE", CHANNEL]);
        s.write_all(&sub)?;
        // The confirmation: after it, every PUBLISH reaches this client.
        read_frames(&mut s, 1, |_| {})?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read_frames(&mut s, n, |_| {}));
        });
    }
    let mut publisher = server.connect()?;
    let mut replies = publisher.try_clone()?;
    // Each PUBLISH is answered with the number of receivers: all of them,
    // or a subscriber was missing and the figures would be wrong.
    let want = format!(":{subscribers}\r\n").into_bytes();
    let replies = std::thread::spawn(move || {
        let mut wrong = 0u64;
        let r = read_frames(&mut replies, n, |f| {
            wrong += u64::from(f != want.as_slice())
        });
        r.and_then(|()| match wrong {
            0 => Ok(()),
            w => Err(io::Error::other(format!(
                "{w} PUBLISH replies did not count {subscribers} subscribers"
            ))),
        })
    });
    let body = vec![b'x'; payload];
    let mut chunk = Vec::new();
    let per_chunk = 512u64;
    for _ in 0..per_chunk {
        encode_command(&mut chunk, &[b"PUBLISH", CHANNEL, &body]);
    }
    let one = chunk.len() / per_chunk as usize;
    let cpu_before = super::cpu_ns(server.pid())?;
    let start = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(per_chunk);
        publisher.write_all(&chunk[..one * k as usize])?;
        left -= k;
    }
    for _ in 0..subscribers {
        match rx.recv_timeout(SCENARIO_LIMIT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(BenchError::Failed(format!(
                    "a redis subscriber failed: {e}"
                )))
            }
            Err(_) => {
                return Err(BenchError::Failed(format!(
                    "redis deliveries incomplete after {SCENARIO_LIMIT:?} (server socket {})",
                    server.socket().display()
                )))
            }
        }
    }
    let took = start.elapsed();
    let cpu = super::cpu_ns(server.pid())?.saturating_sub(cpu_before);
    replies
        .join()
        .map_err(|_| BenchError::Failed("the PUBLISH reply reader panicked".into()))?
        .map_err(|e| BenchError::Failed(format!("the redis publisher: {e}")))?;
    let deliveries = (n * subscribers as u64) as f64;
    Ok(super::Fanned {
        rate: deliveries / took.as_secs_f64(),
        cpu_ns: cpu as f64 / deliveries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_whole_split_and_nested() {
        let msg = b"*3\r\n$7\r\nmessage\r\n$8\r\nbench.t0\r\n$3\r\nxyz\r\n";
        assert_eq!(frame_len(msg).unwrap(), Some(msg.len()));
        // Every cut short of the whole frame is incomplete, never misread.
        for cut in 0..msg.len() {
            assert_eq!(frame_len(&msg[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(frame_len(b":10\r\n+OK").unwrap(), Some(5));
        assert_eq!(frame_len(b"$-1\r\n").unwrap(), Some(5));
        assert_eq!(frame_len(b"*0\r\n").unwrap(), Some(4));
        // A bulk string may hold CR LF: its length, not a scan, frames it.
        assert_eq!(frame_len(b"$4\r\na\r\nb\r\n").unwrap(), Some(10));
        assert_eq!(frame_len(b"*1\r\n*1\r\n:1\r\n").unwrap(), Some(12));
        assert!(frame_len(b"?x\r\n").is_err());
        assert!(frame_len(b"$x\r\n").is_err());

        // Frames fed a byte at a time come out whole and in order.
        let mut stream = Vec::new();
        stream.extend_from_slice(msg);
        stream.extend_from_slice(b":10\r\n");
        stream.extend_from_slice(msg);
        let mut frames = Frames::default();
        let mut got: Vec<Vec<u8>> = Vec::new();
        for b in &stream {
            frames
                .feed(std::slice::from_ref(b), |f| got.push(f.to_vec()))
                .unwrap();
        }
        assert_eq!(got, vec![msg.to_vec(), b":10\r\n".to_vec(), msg.to_vec()]);
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode_command(&mut out, &[b"PUBLISH", b"ch", b"a b"]);
        assert_eq!(out, b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$3\r\na b\r\n");
        assert_eq!(frame_len(&out).unwrap(), Some(out.len()));
    }
}
