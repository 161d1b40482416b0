#!/bin/sh
# io_uring: a large kernel attack surface that seccomp filters do not see into.
# shellcheck source=examples/hostile/attacks/lib.sh
. /hostile/attacks/lib.sh
$hostile io-uring | tee -a "$results"
exit 0
