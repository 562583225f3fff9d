FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY inflight ./inflight
COPY relay ./relay
COPY tracker ./tracker
COPY config ./config
COPY store ./store
COPY tracking ./tracking
RUN pip install --no-cache-dir . && useradd --system --home /var/lib/inflight inflight \
    && mkdir -p /var/lib/inflight && chown inflight /var/lib/inflight
USER inflight
ENTRYPOINT ["inflight"]
CMD ["serve", "--config", "/etc/inflight/inflight.toml"]
