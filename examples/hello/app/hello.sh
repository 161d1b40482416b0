#!/bin/sh
# Prints the greeting rendered at build time, then who it greets.
set -eu
cat "${APP_HOME:-/app}/motd.txt"
echo "${APP_NAME:-hello} says hi to ${1:-world}"
