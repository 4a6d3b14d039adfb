#!/usr/bin/env python3
"""chat.py NAME ROOM -- a fifobus chat client in Python (stdlib only).

Joins topic chat.ROOM on the bus in $FIFOBUS_DIR, publishes every stdin line
as "NAME: line" and prints every message of the room (its own included).
On stdin EOF it waits for its own last messages (PING/PONG barrier), says BYE
and exits 0.  Demonstrates: a non-blocking handshake that cannot hang when no
broker runs, unbuffered binary I/O on the FIFOs with os.read/os.write (no
read-ahead), and one selectors loop over stdin and recv.
"""
import errno
import os
import selectors
import shutil
import signal
import stat
import sys
import tempfile


def bus_dir():
    """Same default rule as the broker."""
    if os.environ.get("FIFOBUS_DIR"):
        return os.environ["FIFOBUS_DIR"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "fifobus")
    if os.geteuid() == 0:
        return "/run/fifobus"
    return f"/tmp/fifobus-{os.getuid()}"


def fail(msg):
    print(msg, file=sys.stderr, flush=True)
    sys.exit(1)


class LineReader:
    """Splits what os.read returns on an fd into lines (without the newline)."""

    def __init__(self, fd):
        self.fd, self.buf = fd, b""

    def read(self):
        """One os.read; returns (complete lines, eof). At EOF a final
        unterminated line is returned too."""
        data = os.read(self.fd, 65536)
        if not data:
            lines = [self.buf] if self.buf else []
            self.buf = b""
            return lines, True
        *lines, self.buf = (self.buf + data).split(b"\n")
        return lines, False


def write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


def open_hello(bus):
    """bus/hello opened for writing, if bus and hello belong to us or root.

    Anyone can make a directory or a FIFO with these names and read what we
    write, so we check before writing: hello is opened relative to the
    checked directory, without following a symbolic link, and the opened
    FIFO itself is checked (a check of the path alone leaves a moment for a
    swap)."""
    no_broker = f"chat: no broker is running on {bus}"

    def check(path, st):
        if st.st_uid not in (os.geteuid(), 0):
            fail(f"chat: {path} belongs to uid {st.st_uid}, not to you "
                 f"(uid {os.geteuid()}) or root: not your broker; not sending HELLO")

    try:
        dfd = os.open(bus, os.O_PATH | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        fail(no_broker)
    try:
        check(bus, os.fstat(dfd))
        hello = os.path.join(bus, "hello")
        try:
            st = os.stat("hello", dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            fail(no_broker)
        check(hello, st)
        if not stat.S_ISFIFO(st.st_mode):
            fail(no_broker)
        try:
            hfd = os.open("hello", os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW,
                          dir_fd=dfd)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENXIO, errno.ELOOP):
                fail(no_broker)  # gone, no reader, or now a symbolic link
            raise
        st = os.fstat(hfd)
        check(hello, st)
        if not stat.S_ISFIFO(st.st_mode):
            fail(no_broker)
        return hfd
    finally:
        os.close(dfd)


def handshake(bus, name, topic):
    """HELLO on bus/hello; returns the client directory."""
    hfd = open_hello(bus)
    tmp = tempfile.mkdtemp(prefix="chat-")  # mode 0700: only we see the reply FIFO
    try:
        reply = os.path.join(tmp, "reply")
        os.mkfifo(reply, 0o600)
        # Open our end first (non-blocking) so the broker's reply never waits.
        rfd = os.open(reply, os.O_RDONLY | os.O_NONBLOCK)
        os.set_blocking(hfd, True)
        hello = f"HELLO reply={reply} name={name} pid={os.getpid()} sub={topic}\n"
        write_all(hfd, hello.encode())
        os.close(hfd)

        sel = selectors.DefaultSelector()
        sel.register(rfd, selectors.EVENT_READ)
        answer = LineReader(rfd)
        while True:
            if not sel.select(timeout=10):
                fail(f"chat: no answer from the broker on {bus}")
            lines, eof = answer.read()
            if lines:
                break
            if eof:
                fail(f"chat: the broker on {bus} closed the handshake")
        os.close(rfd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    kw, _, rest = lines[0].decode(errors="replace").partition(" ")
    if kw != "WELCOME":
        fail(f"chat: {lines[0].decode(errors='replace')}")  # ERR <code> <text>
    _uuid, _, cdir = rest.partition(" ")
    return cdir


def main():
    if len(sys.argv) != 3:
        print("usage: chat.py NAME ROOM", file=sys.stderr)
        return 2
    name, room = sys.argv[1], sys.argv[2]
    topic = f"chat.{room}"
    cdir = handshake(bus_dir(), name, topic)

    recv = os.open(os.path.join(cdir, "recv"), os.O_RDONLY)
    send = os.open(os.path.join(cdir, "send"), os.O_WRONLY)
    print(f"* joined {topic} as {name}", flush=True)

    prefix = f"PUB {topic} {name}: ".encode()
    sel = selectors.DefaultSelector()
    stdin, inbox = LineReader(sys.stdin.fileno()), LineReader(recv)
    sel.register(stdin.fd, selectors.EVENT_READ, stdin)
    sel.register(recv, selectors.EVENT_READ, inbox)
    bye_sent = False
    try:
        while True:
            for key, _ in sel.select():
                lines, eof = key.data.read()
                if key.data is stdin:
                    for line in lines:
                        write_all(send, prefix + line + b"\n")
                    if eof:  # flush our messages through the broker, then BYE
                        sel.unregister(stdin.fd)
                        write_all(send, b"PING bye\n")
                    continue
                for line in lines:
                    kw, _, rest = line.partition(b" ")
                    if kw == b"MSG":
                        _topic, _, payload = rest.partition(b" ")
                        print(payload.decode(errors="replace"), flush=True)
                    elif line == b"PONG bye":
                        write_all(send, b"BYE\n")
                        bye_sent = True
                    elif kw == b"DROPPED":
                        print(f"* dropped {rest.decode()} messages",
                              file=sys.stderr, flush=True)
                    elif kw == b"ERR":
                        print(line.decode(errors="replace"),
                              file=sys.stderr, flush=True)
                    elif kw == b"BYE":
                        eof = True
                if eof:
                    if bye_sent:
                        return 0
                    fail("* broker closed the connection")
    except BrokenPipeError:  # the broker closed send
        fail("* broker closed the connection")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
