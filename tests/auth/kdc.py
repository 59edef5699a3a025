"""A real MIT Kerberos KDC for the tests: a temporary realm on loopback.

Theory of operation
-------------------
:class:`TempRealm` builds a throw-away realm ``GATEWAY.TEST`` in a private directory with
the Debian MIT tools (``tools/install_auth_deps.sh`` installs them):

1. ``krb5.conf`` (client side, ``KRB5_CONFIG``) names the KDC at ``127.0.0.1:<port>`` and
   turns off DNS canonicalization and reverse lookups, so the official client's
   ``HTTP@127.0.0.1`` becomes exactly ``HTTP/127.0.0.1@GATEWAY.TEST``; ``kdc.conf``
   (``KRB5_KDC_PROFILE``) puts the database, stash and log in the directory and the KDC on
   that port (TCP and UDP);
2. ``kdb5_util create -s`` makes the database; ``kadmin.local`` adds the users (with
   passwords) and ``HTTP/<host>`` service principals (random keys) and exports the latter
   to a keytab;
3. ``krb5kdc -n`` runs in the foreground as a subprocess; readiness is its TCP port
   accepting, checked while watching the process;
4. :meth:`kinit` gets a ticket for a user into a credential cache file of the directory
   (password on stdin).

:func:`missing_tools` says precisely what is not installed, for the tests' skip reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

REALM = "GATEWAY.TEST"
TOOLS = ("kdb5_util", "kadmin.local", "krb5kdc", "kinit", "kdestroy")
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def find_tool(name: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_SBIN)
    return shutil.which(name, path=path)


def missing_tools() -> list[str]:
    return [name for name in TOOLS if find_tool(name) is None]


def _free_port() -> int:
    # A port free for both TCP and UDP (the KDC listens on both).
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for the KDC")


@dataclass
class TempRealm:
    """A realm with a running KDC; :meth:`start` / :meth:`stop`."""

    workdir: Path
    users: dict[str, str] = field(default_factory=lambda: {"alice": "alice-pw"})
    service_hosts: tuple[str, ...] = ("127.0.0.1",)
    realm: str = REALM
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None
    start_seconds: float = 0.0

    @property
    def krb5_conf(self) -> Path:
        return self.workdir / "krb5.conf"

    @property
    def kdc_conf(self) -> Path:
        return self.workdir / "kdc.conf"

    @property
    def keytab(self) -> Path:
        return self.workdir / "http.keytab"

    def ccache(self, user: str) -> Path:
        return self.workdir / f"{user}.ccache"

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to use this realm (client or acceptor side)."""
        return {
            "KRB5_CONFIG": str(self.krb5_conf),
            "KRB5_KDC_PROFILE": str(self.kdc_conf),
            "KRB5RCACHEDIR": str(self.workdir / "rcache"),
        }

    def _write_configs(self) -> None:
        host_map = "\n".join(f"    {host} = {self.realm}" for host in self.service_hosts)
        self.krb5_conf.write_text(
            f"""[libdefaults]
    default_realm = {self.realm}
    dns_lookup_realm = false
    dns_lookup_kdc = false
    dns_canonicalize_hostname = false
    rdns = false
    udp_preference_limit = 1
    ticket_lifetime = 1h
    forwardable = false

[realms]
    {self.realm} = {{
        kdc = 127.0.0.1:{self.port}
    }}

[domain_realm]
{host_map}
"""
        )
        self.kdc_conf.write_text(
            f"""[kdcdefaults]
    kdc_ports = {self.port}
    kdc_tcp_ports = {self.port}

[realms]
    {self.realm} = {{
        database_name = {self.workdir / "principal"}
        key_stash_file = {self.workdir / "stash"}
        acl_file = {self.workdir / "kadm5.acl"}
        max_life = 1h
        max_renewable_life = 0
        supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
    }}

[logging]
    kdc = FILE:{self.workdir / "kdc.log"}
    admin_server = FILE:{self.workdir / "kadmin.log"}
    default = FILE:{self.workdir / "krb5lib.log"}
"""
        )
        (self.workdir / "kadm5.acl").write_text("")
        (self.workdir / "rcache").mkdir(exist_ok=True)

    def _run(self, tool: str, args: Iterable[str], *, stdin: str | None = None) -> str:
        path = find_tool(tool)
        if path is None:
            raise RuntimeError(f"{tool} is not installed")
        result = subprocess.run(
            [path, *args],
            input=stdin.encode() if stdin is not None else None,
            env={**os.environ, **self.env},
            capture_output=True,
            timeout=30,
        )
        output = (result.stdout + result.stderr).decode(errors="replace")
        if result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({result.returncode}):\n{output}")
        return output

    def kadmin(self, query: str) -> str:
        return self._run("kadmin.local", ["-r", self.realm, "-q", query])

    def start(self, *, timeout: float = 30.0) -> None:
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_configs()
        self._run("kdb5_util", ["create", "-s", "-r", self.realm, "-P", "master-pw-for-tests"])
        for user, password in self.users.items():
            self.kadmin(f"addprinc -pw {password} {user}")
        for host in self.service_hosts:
            self.kadmin(f"addprinc -randkey HTTP/{host}")
            self.kadmin(f"ktadd -k {self.keytab} HTTP/{host}")
        kdc = find_tool("krb5kdc")
        assert kdc is not None
        with open(self.workdir / "krb5kdc.out", "ab") as out:
            self.process = subprocess.Popen(
                [kdc, "-n", "-r", self.realm, "-P", str(self.workdir / "kdc.pid")],
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"krb5kdc exited with status {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"krb5kdc not listening after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.02)

    def kinit(self, user: str) -> Path:
        """Get a ticket-granting ticket for ``user``; returns the credential cache file."""
        cache = self.ccache(user)
        self._run("kinit", ["-c", f"FILE:{cache}", f"{user}@{self.realm}"], stdin=self.users[user])
        return cache

    def kdestroy(self, user: str) -> None:
        cache = self.ccache(user)
        if cache.exists():
            self._run("kdestroy", ["-c", f"FILE:{cache}"])

    def stop(self, timeout: float = 10.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 30) -> str:
        texts = []
        for name in ("kdc.log", "krb5kdc.out"):
            try:
                text = (self.workdir / name).read_text(errors="replace")
            except OSError:
                continue
            texts.append(f"--- {name}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(texts)
