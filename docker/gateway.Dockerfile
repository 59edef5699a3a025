# syntax=docker/dockerfile:1
# One image for the three services of the trio Dask Gateway. The Helm charts pick the
# program: dask-gateway-api, dask-gateway-scheduler-proxy or dask-gateway-web-proxy.
#
# Build from the repository root (the versions come from requirements/constraints.txt):
#   docker build -f docker/gateway.Dockerfile -t <registry>/dask-gateway-trio/gateway:0.1.0 .

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements/constraints.txt requirements/constraints.txt
COPY libs/common libs/common
COPY services/api services/api
COPY services/scheduler-proxy services/scheduler-proxy
COPY services/web-proxy services/web-proxy
RUN python -m venv /opt/dask-gateway \
    && /opt/dask-gateway/bin/pip install -c requirements/constraints.txt \
        ./libs/common ./services/api ./services/scheduler-proxy ./services/web-proxy

FROM python:3.11-slim
ENV PATH=/opt/dask-gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
RUN useradd --uid 1000 --user-group --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin dask
COPY --from=build /opt/dask-gateway /opt/dask-gateway
# Non-root; the charts also run it with a read-only root filesystem and /tmp as an emptyDir.
USER 1000:1000
WORKDIR /tmp
# 8000 web proxy, 8001 API and the proxies' admin endpoints, 8786 scheduler proxy.
EXPOSE 8000 8001 8786
CMD ["dask-gateway-api", "--help"]
