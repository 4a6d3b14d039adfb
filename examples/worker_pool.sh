#!/usr/bin/env bash
# A pool of shell workers sharing the jobs published on a topic: they join one
# queue group, so each job is done by exactly one of them (round robin,
# passing over a worker that has fallen behind). Each worker publishes what it
# did on TOPIC.done.
#
#   examples/worker_pool.sh [WORKERS] [TOPIC]     # default: 3 workers on "jobs"
#   fifobus pub jobs 'resize photo-1.jpg'         # from anywhere: one worker does it
#   fifobus sub jobs.done                         # watch the results
#
# The job here is a stand-in (upper-casing the payload); put yours in work().
# Ctrl-C (or SIGTERM to the process group) stops the pool; each worker's
# `fifobus sub` leaves the group when it dies, and the others take over.
set -u
workers=${1:-3}
topic=${2:-jobs}

work() {
    printf '%s\n' "$1" | tr '[:lower:]' '[:upper:]'
}

for i in $(seq 1 "$workers"); do
    (
        fifobus sub "$topic" --queue "$topic-workers" --name "worker-$i" |
            while IFS= read -r job; do
                result=$(work "$job")
                fifobus pub "$topic.done" "worker-$i $result" >/dev/null
            done
    ) &
done
trap 'kill 0' INT TERM
wait
