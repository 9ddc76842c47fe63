#!/usr/bin/env bash
# Entrypoint of the hvdkit images. The venv is on PATH (Dockerfile ENV).
#
#   sshd            run sshd in the foreground as this (unprivileged) user, for multi-node jobs:
#                   host key generated on first start in $SSHD_HOST_KEY_DIR (~/.sshd); port
#                   $SSHD_PORT (2222); keys authorized in $SSH_AUTHORIZED_KEYS (~/.ssh/authorized_keys)
#   ssh-keys        create the job's key pair in ~/.ssh (id_ed25519 + authorized_keys) unless it
#                   exists: the compose file runs this once into the volume every node mounts
#   mlflow-server   the team tracking server, mlflow/server.sh (configured by MLFLOW_* variables)
#   anything else   run as given (default: hvdkit doctor)
set -euo pipefail
repo=${HVDKIT_HOME:-/opt/hvdkit}

case "${1:-}" in
  sshd)
    shift
    keydir=${SSHD_HOST_KEY_DIR:-$HOME/.sshd}
    mkdir -p "$keydir"
    chmod 700 "$keydir"
    [ -s "$keydir/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -C "$(hostname)" -f "$keydir/ssh_host_ed25519_key"
    opts=(-o "Port=${SSHD_PORT:-2222}" -o "HostKey=$keydir/ssh_host_ed25519_key")
    [ -n "${SSH_AUTHORIZED_KEYS:-}" ] && opts+=(-o "AuthorizedKeysFile=$SSH_AUTHORIZED_KEYS")
    echo "entrypoint: sshd as $(id -un) on port ${SSHD_PORT:-2222}" >&2
    exec /usr/sbin/sshd -D -e -f "$repo/docker/sshd_config" "${opts[@]}" "$@"
    ;;
  ssh-keys)
    dir=$HOME/.ssh
    mkdir -p "$dir"
    chmod 700 "$dir"
    if [ ! -s "$dir/id_ed25519" ]; then
      ssh-keygen -q -t ed25519 -N '' -C "hvdkit-job" -f "$dir/id_ed25519"
      cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
      chmod 600 "$dir/authorized_keys"
      echo "entrypoint: created the job key pair in $dir" >&2
    fi
    ;;
  mlflow-server)
    shift
    exec "$repo/mlflow/server.sh" "$@"
    ;;
  "")
    exec hvdkit doctor
    ;;
  *)
    exec "$@"
    ;;
esac
