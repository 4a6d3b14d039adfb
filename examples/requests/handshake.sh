# handshake.sh -- sourced by upper-service.sh and ask.sh: the safe shell
# handshake of docs/protocol.md. After `fifobus_connect NAME`, fd 3 reads
# the client's recv and fd 4 writes its send; the client ends with this
# script (pid=$$).

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

fifobus_connect() {
    local name=$1 me owner f tmp kw id cdir
    [ -p "$dir/hello" ] || { echo "$name: no broker is running on $dir" >&2; exit 1; }
    # Talk only to a broker run by us or by root: anyone may make these names.
    me=$(id -u)
    for f in "$dir" "$dir/hello"; do
        owner=$(stat -c %u -- "$f") || exit 1
        if [ "$owner" != "$me" ] && [ "$owner" != 0 ]; then
            echo "$name: $f belongs to uid $owner: not your broker; not sending HELLO" >&2
            exit 1
        fi
    done
    tmp=$(mktemp -d) || exit 1
    mkfifo -m 600 "$tmp/reply" || exit 1
    exec 3<>"$tmp/reply"
    # shellcheck disable=SC2016  # $1 and $2 expand in the child bash
    if ! timeout 2 bash -c 'printf "%s\n" "$1" > "$2"' _ \
        "HELLO reply=$tmp/reply name=$name pid=$$" "$dir/hello"; then
        rm -rf -- "$tmp"
        echo "$name: no broker is running on $dir" >&2
        exit 1
    fi
    read -r -t 10 kw id cdir <&3
    exec 3<&-
    rm -rf -- "$tmp"
    [ "$kw" = WELCOME ] || { echo "$name: $kw $id $cdir" >&2; exit 1; }
    exec 3<"$cdir/recv" 4>"$cdir/send"
}
