#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo need, if missing and if we can.
set -euo pipefail
missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
# the adversarial and broker tests attack with the stock clients, as an outsider would
command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
# the console's browser tests drive Debian's chromium (never a downloaded browser)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
# evidence exports are checked with ffprobe, as the police would check them
command -v ffprobe >/dev/null 2>&1 || missing+=(ffmpeg)
# the store contract suite runs against a real PostgreSQL server (gateway/store_pg.py)
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || missing+=(postgresql)
# the console's Korean page (and its screenshots) needs a CJK font: without it, empty boxes
[ -d /usr/share/fonts/opentype/noto ] && ls /usr/share/fonts/opentype/noto/NotoSansCJK* >/dev/null 2>&1 \
  || missing+=(fonts-noto-cjk)
# tests/cluster start RabbitMQ nodes of their own (the service itself stays stopped)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
# the multi-host test makes its hosts with network namespaces (`ip netns`, veth, a bridge)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "missing Debian packages: ${missing[*]}; install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
