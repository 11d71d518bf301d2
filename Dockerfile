# cargobay container image.
FROM python:3.11-slim

# No CONFIG_PATH: twistd runs in /app, whose config.toml is a link to
# /etc/cargobay/config.toml; a file mounted at /app/config.toml (as the
# earlier implementation's image was run) takes its place.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY cargobay ./cargobay
COPY twisted ./twisted
RUN pip install --no-cache-dir . \
    # Generate the plugin cache at build time: the runtime user cannot write it.
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    # uid 1000 and /var/cache/docker-registry-proxy, as in the earlier
    # implementation's image: a cache volume or host directory it wrote
    # stays writable when only the image changes.
    && useradd --system --uid 1000 --home-dir /nonexistent cargobay \
    && mkdir -p /var/cache/cargobay /var/cache/docker-registry-proxy /etc/cargobay \
    && chown cargobay /var/cache/cargobay /var/cache/docker-registry-proxy \
    && ln -s /etc/cargobay/config.toml /app/config.toml

USER cargobay
VOLUME ["/var/cache/cargobay"]
EXPOSE 5000
# /healthz where the running proxy says it listens (a file under /tmp), else
# where the config says (port, listen, or [metrics] listen).
HEALTHCHECK --interval=30s --timeout=5s CMD ["python", "-m", "cargobay.healthcheck"]
ENTRYPOINT ["twistd", "-n", "--pidfile=", "cargobay"]
