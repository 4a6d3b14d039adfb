#!/usr/bin/env bash
# ask.sh TOPIC PAYLOAD -- one request in plain bash, as fifobus req does it.
#
# Prints the answer and exits 0; exits 3 when nobody serves TOPIC (the
# broker says so at once), 124 when no answer comes within 5 seconds.
set -u
[ "$#" -eq 2 ] || { echo "usage: ask.sh TOPIC PAYLOAD" >&2; exit 2; }
trap '' PIPE
# shellcheck source=handshake.sh
. "$(dirname -- "$0")/handshake.sh"
fifobus_connect ask

id="ask-$$"                              # any word of ours: the answer carries it back
printf 'REQ %s %s %s\n' "$id" "$1" "$2" >&4
deadline=$((SECONDS + 5))
while [ "$SECONDS" -lt "$deadline" ]; do
    IFS= read -r -t 1 line <&3 || continue
    case $line in
        "REPLY $id "*) printf '%s\n' "${line#"REPLY $id "}"; echo BYE >&4; exit 0 ;;
        "ERR no-responders $id") echo "ask: no responders on $1" >&2; echo BYE >&4; exit 3 ;;
        'ERR '*) echo "ask: $line" >&2; echo BYE >&4; exit 1 ;;
    esac
done
echo "ask: no answer on $1 within 5s" >&2
echo BYE >&4
exit 124
