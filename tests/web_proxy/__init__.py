"""Tests of the web proxy (services/web-proxy)."""
