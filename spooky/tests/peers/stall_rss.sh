#!/bin/bash
# Memory a never-reading client costs: Spooky's RSS while aioquic (h3_stall.py) holds
# CONNECTIONS x STREAMS downloads of 16 MiB with its flow-control credit withheld.
#
#   cargo build --release -p spooky -p spooky-peers --bins
#   spooky/tests/peers/stall_rss.sh [QUIC/PROXY YAML LINES...]
#
# e.g. `stall_rss.sh` (defaults), `stall_rss.sh "quic: {max_stalled_streams: 1000000,
# max_stalled_streams_per_ip: 1000000}"` (caps off), `stall_rss.sh "proxy: {memory_limit:
# 256MiB}"`. Prints RSS idle, peak (sampled every 0.5 s) and after, and what the probe saw.
# Runs on 127.0.0.1 only: UDP 9889, TCP 7001-7002 and 9901 must be free.
set -eu
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
B=$ROOT/target/release
CONNECTIONS=${CONNECTIONS:-20}
STREAMS=${STREAMS:-100}
DIR=$(mktemp -d)
{
  echo "version: 1"
  echo "listen: {protocol: http3, address: 127.0.0.1, port: 9889, tls: {cert: $ROOT/config/certs/spooky.crt, key: $ROOT/config/certs/spooky.key}}"
  echo "admin: {address: \"127.0.0.1:9901\"}"
  echo "steering: {pin_path: /sys/fs/bpf/spooky-stall-rss}"
  echo "control_socket: $DIR/control.sock"
  for line in "$@"; do echo "$line"; done
  echo "upstream: {demo: {backends: [{id: demo-1, address: \"127.0.0.1:7001\"}, {id: demo-2, address: \"127.0.0.1:7002\"}]}}"
} > "$DIR/spooky.yaml"
"$B/spooky-demo-backend" --listen 127.0.0.1:7001 --id demo-1 >/dev/null 2>&1 & D1=$!
"$B/spooky-demo-backend" --listen 127.0.0.1:7002 --id demo-2 >/dev/null 2>&1 & D2=$!
"$B/spooky" --config "$DIR/spooky.yaml" --workers 2 --no-pin >"$DIR/spooky.log" 2>&1 & S=$!
trap 'kill $S $D1 $D2 2>/dev/null; wait $S $D1 $D2 2>/dev/null; rm -rf "$DIR"' EXIT
sleep 2
rss() { awk '/VmRSS/{print $2}' "/proc/$S/status"; }
IDLE=$(rss)
python3 "$ROOT/spooky/tests/peers/h3_stall.py" --port 9889 --ca "$ROOT/config/certs/ca.crt" \
  --connections "$CONNECTIONS" --streams "$STREAMS" --wait 10 > "$DIR/probe.json" & P=$!
PEAK=0
for _ in $(seq 1 26); do r=$(rss); [ "$r" -gt "$PEAK" ] && PEAK=$r; sleep 0.5; done
wait $P
sleep 1
AFTER=$(rss)
echo "RSS KiB: idle $IDLE, peak $PEAK, after $AFTER"
echo "probe: $(cat "$DIR/probe.json")"
curl -s http://127.0.0.1:9901/metrics | grep -E '^spooky_(http3_stalled_streams_shed|http3_send_timeouts|memory_shed)_total' \
  | awk '{split($1, n, "{"); s[n[1]] += $2} END {for (k in s) print k, s[k]}'
