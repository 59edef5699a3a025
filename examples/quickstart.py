"""Quickstart with the official dask-gateway client against a running gateway (`make run`).

.venv/bin/python examples/quickstart.py [ADDRESS] [PROXY_ADDRESS]
"""

import sys

from dask_gateway import Gateway


def main() -> None:
    address = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
    proxy_address = sys.argv[2] if len(sys.argv) > 2 else "tls://127.0.0.1:8786"
    gateway = Gateway(address, proxy_address=proxy_address, auth="basic")
    print("server:", gateway.get_versions()["server"])
    cluster = gateway.new_cluster()
    try:
        print("cluster:", cluster.name, "dashboard:", cluster.dashboard_link)
        cluster.scale(2)
        client = cluster.get_client()
        client.wait_for_workers(2, timeout=120)
        futures = client.map(lambda x: x * x, range(100))
        total = client.submit(sum, futures).result()
        print("sum of squares 0..99 =", total)
        assert total == 328350
        client.close()
    finally:
        cluster.shutdown()
    print("clusters left:", gateway.list_clusters())
    # No explicit gateway.close(): the official client closes itself when collected, and
    # its __del__ fails on a second close.


if __name__ == "__main__":
    main()
