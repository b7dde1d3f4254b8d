#!/usr/bin/env bash
# signal_rank.sh SIGNAL RANK MARKER [DELAY [RESUME]]: waits for the process of MPI rank RANK
# whose command line contains MARKER, lets it run DELAY seconds (default 1.5), then sends it
# SIGNAL. With RESUME, sends SIGCONT that many seconds later (a stopped rank must be able to run
# again for the launcher to finish killing it).
set -u
sig=$1 rank=$2 marker=$3 delay=${4:-1.5} resume=${5:-}
for _ in $(seq 1 200); do
  for p in $(pgrep -f -- "$marker"); do
    if tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$rank"; then
      sleep "$delay"
      kill -s "$sig" "$p" || exit 1
      echo "sent SIG$sig to rank $rank (pid $p)"
      [ -n "$resume" ] && (sleep "$resume"; kill -s CONT "$p" 2>/dev/null) &
      exit 0
    fi
  done
  sleep 0.05
done
echo "rank $rank of '$marker' not found" >&2
exit 1
