# Shared by tests/env/up, down and status. Sourced, not run.
# shellcheck shell=bash

env_dir=${AGENT_BUS_ENV_DIR:-${TMPDIR:-/tmp}/agent-bus-env}
cache=${AGENT_BUS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/agent-bus}

log() { printf '[env] %s\n' "$*" >&2; }
die() {
  printf '[env] error: %s\n' "$*" >&2
  exit 1
}

# alive NAME: the process recorded for NAME runs (and is not a zombie).
alive() {
  local file="$env_dir/pids/$1.pid" pid state
  [[ -s $file ]] || return 1
  pid=$(cat "$file")
  kill -0 "$pid" 2>/dev/null || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ $state != Z ]]
}

# free_port: a TCP port on 127.0.0.1 that nothing listens on now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ensure_debian_packages PKG...: installs the packages that are missing, without letting
# their maintainer scripts start system-wide services (we run private instances only).
ensure_debian_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  [[ $(id -u) -eq 0 ]] || die "missing Debian packages ${missing[*]}; install them as root (apt-get install ${missing[*]})"
  log "installing Debian packages: ${missing[*]}"
  local policy=/usr/sbin/policy-rc.d placed=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && placed=1
  fi
  local status=0
  {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" ||
      { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; }
  } >&2 || status=$?
  ((placed)) && rm -f "$policy"
  ((status == 0)) || die "apt-get install ${missing[*]} failed (exit $status)"
}
