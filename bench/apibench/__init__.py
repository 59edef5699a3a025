"""Helpers of bench/api.py: our gateway vs upstream dask-gateway-server, same run."""
