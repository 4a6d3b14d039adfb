#!/usr/bin/env bash
# upper-service.sh [TOPIC] -- a request/reply service in plain bash.
#
# Serves requests on TOPIC (default svc.upper) and answers each with its
# payload in capitals. Speaks the protocol directly: SERVE once, then for
# every "REQUEST <handle> <topic> <payload>" line one "REPLY <handle> <answer>".
# Ask it with:  fifobus req svc.upper 'hello'   (or ask.sh svc.upper hello)
set -u
topic=${1:-svc.upper}
trap '' PIPE
# shellcheck source=handshake.sh
. "$(dirname -- "$0")/handshake.sh"
fifobus_connect upper-service

printf 'SERVE %s\nPING serving\n' "$topic" >&4
while IFS= read -r line <&3; do
    case $line in
        'PONG serving') echo "upper-service: serving $topic" >&2 ;;
        'REQUEST '*)
            rest=${line#REQUEST }
            handle=${rest%% *}; rest=${rest#* }          # the handle, then "<topic> <payload>"
            case $rest in *' '*) payload=${rest#* } ;; *) payload= ;; esac
            printf 'REPLY %s %s\n' "$handle" "${payload^^}" >&4 ;;
        'ERR '*) echo "upper-service: $line" >&2 ;;
        BYE) exit 0 ;;
    esac
done
