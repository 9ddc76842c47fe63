#!/usr/bin/env bash
# Entrypoint of the hvdkit images. The venv is on PATH (Dockerfile ENV).
#
#   sshd                 sshd in the foreground as this (unprivileged) user, port $SSHD_PORT (2222),
#                        keys authorized in $SSH_AUTHORIZED_KEYS (~/.ssh/authorized_keys). Host key:
#                        $SSHD_HOST_KEY (the cluster's, see cluster-keys) or, unset, one generated
#                        in ~/.sshd when the container starts. Never one baked into the image.
#   cluster-keys HOST..  create the cluster's keys in ~/.ssh unless they exist: the job's key pair
#                        (id_ed25519, authorized_keys) and the workers' host key pair
#                        (ssh_host_ed25519_key). The compose file runs it once into the volume
#                        every node mounts; the launcher pins that host key for HOSTs (below).
#   mlflow-server        the team tracking server, mlflow/server.sh (configured by MLFLOW_* variables)
#   mlflow-user NAME     create (or re-password) the MLflow user NAME with $MLFLOW_NEW_USER_PASSWORD,
#                        signed in as the admin ($MLFLOW_ADMIN_USERNAME / $MLFLOW_ADMIN_PASSWORD) at
#                        $MLFLOW_TRACKING_URI, then write that user's ~/.mlflow/credentials (mode 600),
#                        which is how training reads its password: never from the environment.
#   anything else        run as given (default: hvdkit doctor)
#
# Before any of these, for every command:
#   HVDKIT_SSH_HOSTS + HVDKIT_SSH_HOST_PUBKEY   ssh host patterns (space separated) and the public
#                        host key they must present: written to ~/.hvdkit-ssh/known_hosts, with an
#                        ssh config block for those hosts only (port 2222, StrictHostKeyChecking yes),
#                        which the image's ssh config includes. Other hosts keep ssh's defaults.
#   HVDKIT_WAIT_FOR      what to wait for first, space separated: tcp:HOST:PORT, http:URL (any
#                        answer but a connection error), file:PATH. Compose tools that cannot wait
#                        for a healthy service (podman-compose on podman 4.3) start everything at
#                        once; each service waits for what it needs. HVDKIT_WAIT_TIMEOUT (300 s).
set -euo pipefail
repo=${HVDKIT_HOME:-/opt/hvdkit}
die() { echo "entrypoint: error: $*" >&2; exit 2; }

wait_for() {
  local deadline=$(( SECONDS + ${HVDKIT_WAIT_TIMEOUT:-300} )) item ok
  for item in $1; do
    while :; do
      ok=
      case "$item" in
        tcp:*:*) { local hp=${item#tcp:}; timeout 3 bash -c "exec 3<>/dev/tcp/${hp%:*}/${hp##*:}" 2>/dev/null && ok=1; } || true ;;
        http:*|https:*) python3 - "${item#http:}" <<'EOF' 2>/dev/null && ok=1 || true
import sys, urllib.error, urllib.request
url = sys.argv[1] if "://" in sys.argv[1] else "http:" + sys.argv[1]
try:
    urllib.request.urlopen(url, timeout=3)
except urllib.error.HTTPError:
    pass  # the server answers: that is all we wait for
EOF
          ;;
        file:*) [ -s "${item#file:}" ] && ok=1 ;;
        *) die "HVDKIT_WAIT_FOR item '$item' is not tcp:HOST:PORT, http:URL or file:PATH" ;;
      esac
      [ -n "$ok" ] && break
      [ $SECONDS -lt $deadline ] || die "gave up waiting for $item after ${HVDKIT_WAIT_TIMEOUT:-300} s (HVDKIT_WAIT_FOR)"
      sleep 1
    done
  done
}

pin_cluster_hosts() {
  local pub=$HVDKIT_SSH_HOST_PUBKEY dir=$HOME/.hvdkit-ssh patterns=() p
  [ -s "$pub" ] || die "HVDKIT_SSH_HOST_PUBKEY $pub is missing or empty — fix: mount the cluster's host public key there"
  read -r -a patterns <<<"$HVDKIT_SSH_HOSTS"
  local names=""
  for p in "${patterns[@]}"; do
    [[ $p =~ ^[A-Za-z0-9.*?_-]+$ ]] || die "HVDKIT_SSH_HOSTS entry '$p' is not a host name or pattern"
    names+="${names:+,}$p,[$p]:${SSHD_PORT:-2222}"
  done
  mkdir -p "$dir"
  chmod 700 "$dir"
  printf '%s %s\n' "$names" "$(cut -d' ' -f1,2 "$pub")" >"$dir/known_hosts"
  cat >"$dir/hosts.conf" <<EOF
# written by the hvdkit entrypoint: the cluster's workers, pinned to the cluster's host key
Host ${patterns[*]}
    Port ${SSHD_PORT:-2222}
    StrictHostKeyChecking yes
    UserKnownHostsFile $dir/known_hosts
    HashKnownHosts no
EOF
}

if [ -n "${HVDKIT_WAIT_FOR:-}" ]; then wait_for "$HVDKIT_WAIT_FOR"; fi
if [ -n "${HVDKIT_SSH_HOSTS:-}" ]; then pin_cluster_hosts; fi

case "${1:-}" in
  sshd)
    shift
    if [ -n "${SSHD_HOST_KEY:-}" ]; then
      [ -r "$SSHD_HOST_KEY" ] || die "SSHD_HOST_KEY $SSHD_HOST_KEY is not readable — fix: mount the cluster's host key there (cluster-keys makes one)"
      hostkey=$SSHD_HOST_KEY
    else
      keydir=${SSHD_HOST_KEY_DIR:-$HOME/.sshd}
      mkdir -p "$keydir"
      chmod 700 "$keydir"
      [ -s "$keydir/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -C "$(hostname)" -f "$keydir/ssh_host_ed25519_key"
      hostkey=$keydir/ssh_host_ed25519_key
    fi
    opts=(-o "Port=${SSHD_PORT:-2222}" -o "HostKey=$hostkey")
    [ -n "${SSH_AUTHORIZED_KEYS:-}" ] && opts+=(-o "AuthorizedKeysFile=$SSH_AUTHORIZED_KEYS")
    echo "entrypoint: sshd as $(id -un) on port ${SSHD_PORT:-2222}, host key $(ssh-keygen -l -f "$hostkey" | cut -d' ' -f2)" >&2
    exec /usr/sbin/sshd -D -e -f "$repo/docker/sshd_config" "${opts[@]}" "$@"
    ;;
  cluster-keys|ssh-keys)
    dir=$HOME/.ssh
    mkdir -p "$dir"
    chmod 700 "$dir"
    umask 077
    if [ ! -s "$dir/id_ed25519" ]; then
      ssh-keygen -q -t ed25519 -N '' -C "hvdkit-job" -f "$dir/id_ed25519"
      cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
      echo "entrypoint: created the job key pair in $dir" >&2
    fi
    if [ ! -s "$dir/ssh_host_ed25519_key" ]; then
      ssh-keygen -q -t ed25519 -N '' -C "hvdkit-cluster-host" -f "$dir/ssh_host_ed25519_key"
      echo "entrypoint: created the cluster host key $(ssh-keygen -l -f "$dir/ssh_host_ed25519_key" | cut -d' ' -f2)" >&2
    fi
    ;;
  mlflow-server)
    shift
    exec "$repo/mlflow/server.sh" "$@"
    ;;
  mlflow-user)
    name=${2:-}
    [[ $name =~ ^[A-Za-z0-9_.@-]+$ ]] || die "mlflow-user needs a user name (letters, digits, _.@-), got '${name}'"
    [ -n "${MLFLOW_NEW_USER_PASSWORD:-}" ] || die "MLFLOW_NEW_USER_PASSWORD is not set — fix: set it to the new user's password (12+ characters)"
    [ ${#MLFLOW_NEW_USER_PASSWORD} -ge 12 ] || die "MLFLOW_NEW_USER_PASSWORD is shorter than 12 characters — fix: choose a longer one"
    [ -n "${MLFLOW_ADMIN_PASSWORD:-}" ] || die "MLFLOW_ADMIN_PASSWORD is not set — fix: set it to the server's admin password"
    [ -n "${MLFLOW_TRACKING_URI:-}" ] || die "MLFLOW_TRACKING_URI is not set — fix: point it at the MLflow server, e.g. http://mlflow:5000"
    exec python3 "$repo/mlflow/create-user.py" "$name"
    ;;
  "")
    exec hvdkit doctor
    ;;
  *)
    exec "$@"
    ;;
esac
