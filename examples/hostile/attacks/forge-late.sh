#!/bin/sh
# A forged kernel panic late in the console (the VMM's exit is classified from the console's
# tail today), and the agent's last progress lines once more.
# shellcheck source=examples/hostile/attacks/lib.sh
. /hostile/attacks/lib.sh
echo "# printed (judged from the outside: the node's events and exit): forged kernel panic" >>"$results"
echo "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000000"
echo "---[ end Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000000 ]---"
echo "==> upload"
echo "==> notify"
exit 0
