#!/usr/bin/env bash
# Install the Debian packages whose programs the test fixtures start (tests/services/):
#   mosquitto, mosquitto-clients  the MQTT broker and mosquitto_pub/mosquitto_passwd
#   victoria-metrics              the InfluxDB-compatible store for influxdb-client writes
#   postgresql                    initdb/postgres (the fixtures run their own cluster)
# and the fonts the fleet renders content with (fleet/content/fonts.py, docs/dependencies.md):
#   fonts-noto-core               Noto Sans (Latin) and Noto Sans Arabic
#   fonts-droid-fallback          Droid Sans Fallback (Chinese, Japanese, Korean), 1.8 MB
#   libfribidi0                   bidirectional text for Pillow's raqm layout (Arabic)
#
# Idempotent and fast: when every package is installed it only asks dpkg, never apt.
#
# System services: the packages normally start their own daemons (mosquitto on 1883,
# PostgreSQL's "main" cluster on 5432, VictoriaMetrics on 8428).  The tests never use them:
# every fixture starts a private instance in a temp dir on a port the kernel hands out from
# the ephemeral range (32768+), so a running system daemon cannot collide with a test.  We
# still keep apt from starting them (policy-rc.d, below): they are not needed, and a broker
# or database listening on a well-known port of a developer machine would be a surprise.
set -euo pipefail

# `install-system-packages.sh demo` installs only what `palaute demo` needs (it renders its
# content with the fonts; broker and database are embedded); no argument: everything.
RENDERING=(fonts-noto-core fonts-droid-fallback libfribidi0)
if [ "${1:-}" = demo ]; then
    PACKAGES=("${RENDERING[@]}")
else
    PACKAGES=(mosquitto mosquitto-clients victoria-metrics postgresql "${RENDERING[@]}")
fi

installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

missing=()
for package in "${PACKAGES[@]}"; do
    installed "$package" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# invoke-rc.d and deb-systemd-invoke consult /usr/sbin/policy-rc.d; exit code 101 means
# "do not start services".  Only install ours if the machine has none, and always remove it.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    trap 'as_root rm -f "$policy"' EXIT
    printf '#!/bin/sh\n# Temporary, from palaute scripts/install-system-packages.sh\nexit 101\n' \
        | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
fi

echo "Installing Debian packages: ${missing[*]}"
as_root apt-get update -qq
# sudo drops the environment, so pass DEBIAN_FRONTEND through env.
as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
