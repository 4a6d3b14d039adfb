#!/usr/bin/env bash
# chat.sh NAME ROOM -- a fifobus chat client in plain bash.
#
# Joins topic chat.ROOM on the bus in $FIFOBUS_DIR, publishes every stdin line
# as "NAME: line" and prints every message of the room (its own included).
# On stdin EOF it waits for its own last messages (PING/PONG barrier), says
# BYE and exits 0.  Demonstrates: the shell handshake, a background reader on
# recv (kept open on fd 3), and the foreground writing to send (fd 4).
set -u

if [ "$#" -ne 2 ]; then
    echo "usage: chat.sh NAME ROOM" >&2
    exit 2
fi
name=$1 topic="chat.$2"

# Same default rule as the broker.
dir=${FIFOBUS_DIR:-}
if [ -z "$dir" ]; then
    if [ -n "${XDG_RUNTIME_DIR:-}" ]; then
        dir="$XDG_RUNTIME_DIR/fifobus"
    else
        dir="/tmp/fifobus-$(id -u)"
        [ "$(id -u)" = 0 ] && dir=/run/fifobus
    fi
fi

tmp="" reader=""
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    if [ -n "$reader" ]; then kill "$reader" 2>/dev/null; fi
    if [ -n "$tmp" ]; then rm -rf -- "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 1' USR1      # sent by the reader when the broker closed recv
trap '' PIPE            # a write to a closed FIFO fails instead of killing us

no_broker() {
    echo "chat: no broker is running on $dir" >&2
    exit 1
}

# --- handshake -----------------------------------------------------------
[ -p "$dir/hello" ] || no_broker
# Anyone can make a directory or a FIFO with these names and read what we
# write: talk only to a broker run by us or by root. (stat does not follow
# a symbolic link: a link someone else planted is theirs.)
me=$(id -u)
for f in "$dir" "$dir/hello"; do
    owner=$(stat -c %u -- "$f") || no_broker
    if [ "$owner" != "$me" ] && [ "$owner" != 0 ]; then
        echo "chat: $f belongs to uid $owner, not to you (uid $me) or root: not your broker; not sending HELLO" >&2
        exit 1
    fi
done
tmp=$(mktemp -d) || exit 1      # mode 0700: nobody else sees the reply FIFO
reply="$tmp/reply"
mkfifo -m 600 "$reply" || exit 1
exec 3<>"$reply"        # read-write open never blocks; the broker can open it at once
# Opening hello for writing blocks while nobody reads it: bound that wait.
# shellcheck disable=SC2016  # $1 and $2 expand in the child bash
timeout 2 bash -c 'printf "%s\n" "$1" > "$2"' _ \
    "HELLO reply=$reply name=$name pid=$$ sub=$topic" "$dir/hello" || no_broker
if ! read -r -t 10 kw id cdir <&3; then
    echo "chat: no answer from the broker on $dir" >&2
    exit 1
fi
exec 3<&-
rm -rf -- "$tmp"; tmp=""
if [ "$kw" != WELCOME ]; then
    echo "chat: $kw $id $cdir" >&2     # ERR <code> <text>
    exit 1
fi

exec 3<"$cdir/recv" 4>"$cdir/send"   # both return at once: the broker holds the other ends
echo "* joined $topic as $name"

# --- reader: everything that arrives on recv -----------------------------
read_recv() {
    local line rest bye_sent=0
    while IFS= read -r line; do
        case $line in
            'MSG '*)
                rest=${line#MSG }                   # "<topic> <payload>"
                case $rest in
                    *' '*) printf '%s\n' "${rest#* }" ;;
                    *) echo ;;                      # empty payload
                esac ;;
            'PONG bye')                             # all our messages came back
                echo BYE >&4
                bye_sent=1 ;;
            'DROPPED '*) echo "* dropped ${line#DROPPED } messages" >&2 ;;
            'ERR '*) printf '%s\n' "$line" >&2 ;;
            BYE) [ "$bye_sent" = 1 ] && exit 0
                 break ;;                           # broker shutting down
        esac
    done <&3
    [ "$bye_sent" = 1 ] && exit 0                   # EOF after our BYE is fine
    echo "* broker closed the connection" >&2
    kill -USR1 "$$" 2>/dev/null
    exit 1
}
read_recv &
reader=$!
exec 3<&-               # only the reader keeps recv open

# --- writer: stdin lines become PUBs -------------------------------------
while IFS= read -r line || [ -n "$line" ]; do
    printf 'PUB %s %s: %s\n' "$topic" "$name" "$line" >&4 || break
done
printf 'PING bye\n' >&4 2>/dev/null
wait "$reader"
status=$?
reader=""
exit "$status"
