"""Building blocks of ``bench/proxies.py``: backends, route feed, proxy launchers, load
generators and /proc accounting. Imported only by the bench, never by the services."""
