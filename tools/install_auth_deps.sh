#!/usr/bin/env bash
# System packages for the authentication tests (tests/auth), run by `make install-test`.
#
# * a real MIT Kerberos KDC and its tools: krb5-kdc (krb5kdc), krb5-admin-server
#   (kadmin.local, kdb5_util), krb5-user (kinit, klist, kdestroy);
# * libkrb5-dev + gcc: headers and krb5-config, needed to build the Python bindings
#   `gssapi` (the API's Kerberos authenticator) and `pykerberos` (the official client's
#   KerberosAuth) from their source distributions.
#
# JupyterHub needs nothing from here: the tests run it with an in-memory proxy class, so
# configurable-http-proxy (npm) is not required.
#
# Idempotent: when every package is already installed nothing is done (no apt-get update).
# Needs root (or sudo) for apt-get; without either it says what is missing and exits 0, so
# the tests then report the precise reason as a skip instead of the whole install failing.
set -euo pipefail

PACKAGES=(krb5-kdc krb5-admin-server krb5-user libkrb5-dev gcc)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install_auth_deps: all packages present (${PACKAGES[*]})"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_auth_deps: apt-get not available; missing: ${missing[*]}" >&2
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install_auth_deps: not root and no sudo; missing: ${missing[*]}" >&2
        exit 0
    fi
fi

echo "install_auth_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# The packages' maintainer scripts try to start the system KDC; there is no init system
# here and the tests start their own KDC, so a failed service start must not fail dpkg.
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing[@]}"
echo "install_auth_deps: done"
