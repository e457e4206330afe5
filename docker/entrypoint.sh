#!/bin/sh
# ShadowSpot container entry point.
#   shadowspot-entrypoint shadowspot serve --config ...   check the config, then run the node
#   shadowspot-entrypoint healthcheck                      exit 0 when GET /health answers 200
# SHADOWSPOT_CONFIG names the configuration file (default /etc/shadowspot/shadowspot.toml).
set -eu

CONFIG="${SHADOWSPOT_CONFIG:-/etc/shadowspot/shadowspot.toml}"

if [ "${1:-}" = "healthcheck" ]; then
    exec python - "$CONFIG" <<'PY'
import sys
import urllib.error
import urllib.request

from node.config import load_config

http = load_config(sys.argv[1]).http
if not http.enabled:
    sys.exit(0)  # nothing to ask: the endpoint is switched off in the config
host = "127.0.0.1" if http.host in ("0.0.0.0", "") else http.host
host = "[::1]" if host == "::" else host
try:
    with urllib.request.urlopen(f"http://{host}:{http.port}/health", timeout=8) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError) as exc:
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
PY
fi

if [ "$#" -eq 0 ]; then
    set -- shadowspot serve --config "$CONFIG"
fi

# `shadowspot serve` validates the whole config first: on any mistake it lists every problem
# and exits 2 (a volume the shadowspot user cannot write is one of them).
exec "$@"
