#!/bin/sh
# The rebuild example's app: its version line (the line the benchmark changes) and the digest
# its dependency step computed.
. /app/version.sh
echo "rebuild example $APP_VERSION, dependencies $(cat /deps/digest.txt)"
