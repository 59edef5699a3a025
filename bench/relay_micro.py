"""Micro-benchmark of the byte relay alone (no SNI, no routing): where does the CPU go?

Compares, on loopback: direct (no proxy: the ceiling), the generic Stream ``relay()``
over SocketStreams, ``relay_sockets`` as two trio tasks (trio-copy / trio-splice) and in the
relay engine thread in its three splice modes (copy / auto / splice).
Each proxy runs in its own process; its CPU time is read from /proc/<pid>/schedstat
(nanoseconds) around each workload, so client and server CPU are not counted.

Workloads:
  bulk up / bulk down  one connection moving --bulk-mib MiB (plain TCP, or TLS end to end
                       with --tls): MB/s and proxy CPU s/GiB
  round trips          --conns connections each doing 64-byte ping-pong for --seconds:
                       req/s, p50/p99 latency, proxy CPU µs/req, proxy RSS

Usage: .venv/bin/python bench/relay_micro.py [--bulk-mib 1024] [--conns 1 200] [--tls]
"""

from __future__ import annotations

import argparse
import datetime
import os
import selectors
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODES = ["direct", "generic", "trio-copy", "trio-splice", "copy", "auto", "splice"]
CHUNK = 1 << 20
MSG = 64


# ---- child processes -----------------------------------------------------------------------


def run_proxy(mode: str, target_port: int) -> None:
    import trio

    from dask_gateway_common.relay import relay, relay_sockets

    engine = not mode.startswith("trio-")
    splice = {"copy": False, "auto": None, "splice": True}.get(mode.removeprefix("trio-"))

    async def handle(client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", target_port)
        if mode == "generic":
            # StapledStream hides the SocketStream type: the plain receive_some/send_all path.
            await relay(trio.StapledStream(client, client), trio.StapledStream(upstream, upstream))
        else:
            await relay_sockets(client.socket, upstream.socket, use_splice=splice, engine=engine)

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
        print(listeners[0].socket.getsockname()[1], flush=True)
        await trio.serve_listeners(handle, listeners)

    trio.run(main)


def run_server(kind: str, tls_dir: str | None) -> None:
    """bulk: threaded, 'U'+8 bytes = sink that many then reply the count, 'D'+8 bytes =
    source.
    echo: one selector loop echoing everything."""
    lsock = socket.create_server(("127.0.0.1", 0), backlog=4096)
    print(lsock.getsockname()[1], flush=True)
    if kind == "echo":
        sel = selectors.DefaultSelector()
        lsock.setblocking(False)
        sel.register(lsock, selectors.EVENT_READ)
        buf = bytearray(65536)
        while True:
            for key, _ in sel.select():
                s = key.fileobj
                if s is lsock:
                    conn, _ = lsock.accept()
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    n = s.recv_into(buf)
                except (BlockingIOError, ConnectionError):
                    n = -1
                if n > 0:
                    s.sendall(memoryview(buf)[:n])
                elif n == 0:
                    sel.unregister(s)
                    s.close()
    ctx = None
    if tls_dir:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(f"{tls_dir}/cert.pem", f"{tls_dir}/key.pem")

    def serve(conn: socket.socket) -> None:
        if ctx is not None:
            conn = ctx.wrap_socket(conn, server_side=True)
        cmd = recv_exactly(conn, 1)
        if cmd == b"U":
            want = int.from_bytes(recv_exactly(conn, 8), "big")
            total, buf = 0, bytearray(CHUNK)
            while total < want and (n := conn.recv_into(buf)):
                total += n
            conn.sendall(total.to_bytes(8, "big"))
        else:
            left = int.from_bytes(recv_exactly(conn, 8), "big")
            block = memoryview(bytes(CHUNK))
            while left:
                conn.sendall(block[: min(left, CHUNK)])
                left -= min(left, CHUNK)
        conn.close()

    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def run_loadgen(port: int, conns: int, seconds: float) -> None:
    """conns connections, each a 64-byte ping-pong loop; prints count, p50 µs, p99 µs."""
    sel = selectors.DefaultSelector()
    msg = b"x" * MSG
    socks = []
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks.append(s)
    # one warm-up exchange each, so every proxied connection is fully set up
    for s in socks:
        s.setblocking(True)
        s.sendall(msg)
        recv_exactly(s, MSG)
        s.setblocking(False)
    print("ready", flush=True)
    sys.stdin.readline()  # the parent samples the proxy CPU, then says go
    started: dict[int, int] = {}
    got: dict[int, int] = {}
    lat: list[int] = []
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
        started[s.fileno()] = time.perf_counter_ns()
        got[s.fileno()] = 0
        s.send(msg)
    end = time.monotonic() + seconds
    count = 0
    while time.monotonic() < end:
        for key, _ in sel.select(0.1):
            s = key.fileobj
            fd = s.fileno()
            got[fd] += len(s.recv(4096))
            if got[fd] >= MSG:
                now = time.perf_counter_ns()
                lat.append(now - started[fd])
                count += 1
                got[fd] = 0
                started[fd] = now
                s.send(msg)
    lat.sort()
    p50 = lat[len(lat) // 2] / 1000 if lat else 0
    p99 = lat[int(len(lat) * 0.99)] / 1000 if lat else 0
    print(count, p50, p99, flush=True)
    sys.stdin.readline()  # keep the connections open until the parent sampled RSS
    for s in socks:
        s.close()


# ---- the parent ----------------------------------------------------------------------------


def spawn(*args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of pid, in ns (schedstat is per thread)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:  # thread ended meanwhile
            pass
    return total


def user_sys(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of pid (all threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_tls(tmp: str) -> tuple[ssl.SSLContext, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    Path(tmp, "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(tmp, "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx, tmp


def bulk(port: int, direction: str, nbytes: int, ctx: ssl.SSLContext | None) -> float:
    """Move nbytes one way through port; return seconds."""
    conn = socket.create_connection(("127.0.0.1", port))
    if ctx is not None:
        conn = ctx.wrap_socket(conn, server_hostname="bench")
    start = time.perf_counter()
    if direction == "up":
        conn.sendall(b"U" + nbytes.to_bytes(8, "big"))
        block = memoryview(bytes(CHUNK))
        left = nbytes
        while left:
            conn.sendall(block[: min(left, CHUNK)])
            left -= min(left, CHUNK)
        assert int.from_bytes(recv_exactly(conn, 8), "big") == nbytes
    else:
        conn.sendall(b"D" + nbytes.to_bytes(8, "big"))
        total, buf = 0, bytearray(CHUNK)
        while total < nbytes and (n := conn.recv_into(buf)):
            total += n
        assert total == nbytes
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def rtt(port: int, conns: int, seconds: float, pids: list[int]) -> tuple[float, ...]:
    """One round-trip run: (requests, p50 µs, p99 µs, proxy CPU s, proxy RSS MiB)."""
    gen = subprocess.Popen(
        [sys.executable, __file__, "--child", "loadgen", str(port), str(conns), str(seconds)],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
    )
    assert gen.stdout is not None and gen.stdin is not None
    assert gen.stdout.readline().strip() == "ready"
    c0 = cpu_ns(pids[1]) if pids else 0
    gen.stdin.write("go\n")
    gen.stdin.flush()
    count, p50, p99 = gen.stdout.readline().split()
    cpu = (cpu_ns(pids[1]) - c0) / 1e9 if pids else 0.0
    rss = rss_mib(pids[1]) if pids else 0.0
    gen.stdin.write("done\n")
    gen.stdin.flush()
    gen.wait()
    return float(count), float(p50), float(p99), cpu, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bulk-mib", type=int, default=1024)
    parser.add_argument("--conns", type=int, nargs="*", default=[1, 200])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--modes", nargs="*", default=MODES)
    parser.add_argument("--tls", action="store_true", help="bulk through TLS end to end")
    parser.add_argument("--repeat", type=int, default=1, help="report the median of N runs")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        role, *rest = args.child
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        if role == "proxy":
            run_proxy(rest[0], int(rest[1]))
        elif role == "server":
            run_server(rest[0], rest[1] if len(rest) > 1 else None)
        elif role == "loadgen":
            run_loadgen(int(rest[0]), int(rest[1]), float(rest[2]))
        return

    tmp = tempfile.mkdtemp()
    ctx, tls_dir = make_tls(tmp) if args.tls else (None, None)
    bulk_srv, bulk_port = spawn("--child", "server", "bulk", *([tls_dir] if tls_dir else []))
    echo_srv, echo_port = spawn("--child", "server", "echo")
    nbytes = args.bulk_mib << 20
    gib = nbytes / (1 << 30)
    print(
        f"relay micro-benchmark: bulk {args.bulk_mib} MiB {'TLS' if args.tls else 'plain TCP'}, "
        f"64-byte round trips for {args.seconds:g} s, {os.cpu_count()} cores"
    )
    header = f"{'mode':8} {'dir':5} {'MB/s':>8} {'xdirect':>8} {'cpu s/GiB':>10}"
    print(header)
    direct: dict[str, float] = {}
    rows: list[str] = []
    try:
        for mode in args.modes:
            proxies = []
            if mode == "direct":
                bport, eport, pids = bulk_port, echo_port, []
            else:
                p1, bport = spawn("--child", "proxy", mode, str(bulk_port))
                p2, eport = spawn("--child", "proxy", mode, str(echo_port))
                proxies = [p1, p2]
                pids = [p1.pid, p2.pid]
            for direction in ("up", "down"):
                bulk(bport, direction, 8 << 20, ctx)  # warm-up
                runs = []
                for _ in range(args.repeat):
                    c0 = cpu_ns(pids[0]) if pids else 0
                    u0 = user_sys(pids[0]) if pids else (0.0, 0.0)
                    secs = bulk(bport, direction, nbytes, ctx)
                    u1 = user_sys(pids[0]) if pids else (0.0, 0.0)
                    cpu = (cpu_ns(pids[0]) - c0) / 1e9 if pids else 0.0
                    runs.append((secs, cpu, u1[0] - u0[0], u1[1] - u0[1]))
                secs, cpu, usr, sys_ = (statistics.median(col) for col in zip(*runs, strict=True))
                mbs = nbytes / secs / 1e6
                if mode == "direct":
                    direct[direction] = mbs
                ratio = mbs / direct[direction] if direct.get(direction) else float("nan")
                cpu_txt = (
                    f"{cpu / gib:10.3f}  (user {usr / gib:.2f}, sys {sys_ / gib:.2f})"
                    if pids
                    else f"{'-':>10}"
                )
                print(f"{mode:8} {direction:5} {mbs:8.0f} {ratio:8.2f} {cpu_txt}", flush=True)
            for conns in args.conns:
                samples = [rtt(eport, conns, args.seconds, pids) for _ in range(args.repeat)]
                n, p50, p99, cpu, rss = (
                    statistics.median(col) for col in zip(*samples, strict=True)
                )
                per_req = f"{cpu / n * 1e6:7.1f}" if pids and n else f"{'-':>7}"
                rows.append(
                    f"{mode:8} {conns:5} {n / args.seconds:9.0f} {p50:8.0f} "
                    f"{p99:8.0f} {per_req:>10} {rss:8.1f}"
                )
            for p in proxies:
                p.terminate()
                p.wait()
        print(
            f"\n{'mode':8} {'conns':>5} {'req/s':>9} {'p50 µs':>8} {'p99 µs':>8} "
            f"{'cpu µs/req':>10} {'RSS MiB':>8}"
        )
        for row in rows:
            print(row)
    finally:
        for p in (bulk_srv, echo_srv):
            p.terminate()
            p.wait()


if __name__ == "__main__":
    main()
