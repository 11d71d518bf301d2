# cargobay container image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 CONFIG_PATH=/etc/cargobay/config.toml

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY cargobay ./cargobay
COPY twisted ./twisted
RUN pip install --no-cache-dir . \
    # Generate the plugin cache at build time: the runtime user cannot write it.
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && useradd --system --uid 10001 --home-dir /nonexistent cargobay \
    && mkdir -p /var/cache/cargobay /etc/cargobay \
    && chown cargobay /var/cache/cargobay

USER cargobay
VOLUME ["/var/cache/cargobay"]
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/healthz')"
ENTRYPOINT ["twistd", "-n", "--pidfile=", "cargobay"]
