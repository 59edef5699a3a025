# syntax=docker/dockerfile:1
# The image of each Dask cluster's scheduler and worker pods: dask, distributed, bokeh (the
# dashboard) and the official dask-gateway package, whose scheduler preload reports to the
# API. Users usually derive their own image from it with their libraries.
#
# Build from the repository root (the versions come from requirements/constraints.txt):
#   docker build -f docker/cluster.Dockerfile -t <registry>/dask-gateway-trio/cluster:0.1.0 .

FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY requirements/constraints.txt docker/cluster-requirements.txt /tmp/requirements/
RUN pip install -c /tmp/requirements/constraints.txt -r /tmp/requirements/cluster-requirements.txt \
    && rm -rf /tmp/requirements \
    && useradd --uid 1000 --user-group --create-home --home-dir /home/dask \
        --shell /bin/bash dask
USER 1000:1000
WORKDIR /home/dask
# 8786 scheduler, 8787 dashboard, 8788 the preload's API (spec 5.1, Kubernetes ports).
EXPOSE 8786 8787 8788
CMD ["dask", "scheduler", "--help"]
