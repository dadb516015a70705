#!/usr/bin/env bash
# Run a command in a new network namespace that has only the loopback
# interface, when this machine lets us create one (root and unshare present).
# Otherwise run it directly: every service the tests start binds 127.0.0.1.
set -euo pipefail
export RAY_USAGE_STATS_ENABLED=0 AWS_EC2_METADATA_DISABLED=true
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && unshare -n true 2>/dev/null; then
  exec unshare -n sh -c 'ip link set lo up && exec "$@"' sh "$@"
fi
echo "note: cannot create a network namespace here; running tests on the host network (services bind 127.0.0.1)" >&2
exec "$@"
