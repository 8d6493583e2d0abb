# syntax=docker/dockerfile:1
#
# remote-mcp-proxy image.
#
#   docker build -t remote-mcp-proxy .                                  # distroless (default target)
#   docker build -t remote-mcp-proxy \
#     --build-arg MCP_NPM_PACKAGES="@modelcontextprotocol/server-memory @modelcontextprotocol/server-filesystem" .
#   docker build --target full -t remote-mcp-proxy:full .               # + npm/npx, python3, pip, pipx
#
#   docker run -d -p 8080:8080 -v "$PWD/config:/config:ro" -v mcp-data:/data \
#     -e MCP_PROXY_TOKEN="$(openssl rand -hex 32)" remote-mcp-proxy
#
#   HTTPS without a reverse proxy (the files are re-read when renewed; HEALTHCHECK follows the variables):
#   docker run -d -p 443:8443 -v "$PWD/config:/config:ro" -v mcp-data:/data -v /etc/letsencrypt:/etc/letsencrypt:ro \
#     -e MCP_PROXY_PORT=8443 -e MCP_PROXY_TLS_CERT=/etc/letsencrypt/live/mcp.example.com/fullchain.pem \
#     -e MCP_PROXY_TLS_KEY=/etc/letsencrypt/live/mcp.example.com/privkey.pem \
#     -e MCP_PROXY_TOKEN="$(openssl rand -hex 32)" remote-mcp-proxy
#
# Default target: gcr.io/distroless/nodejs24-debian12:nonroot with dist/proxy.js, the baked npm packages and
# tini (static) as PID 1. No shell, no npm: `npx -y PKG …` entries of the config run the baked PKG with the
# image's node (MCP_PROXY_PACKAGES_DIR); any other command must exist in the image.

ARG NODE_IMAGE=node:24-bookworm-slim
ARG DISTROLESS_IMAGE=gcr.io/distroless/nodejs24-debian12:nonroot

# ── builder: bundle proxy.ts into dist/proxy.js; fetch tini-static from Debian ─────────────────────────────
FROM ${NODE_IMAGE} AS builder
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && /usr/bin/tini-static --version
WORKDIR /src
COPY package.json package-lock.json ./
RUN --mount=type=cache,target=/root/.npm npm ci --no-audit --no-fund --no-update-notifier
COPY build.mjs tsconfig.json proxy.ts ./
RUN node build.mjs \
 && mkdir -p /out/data /out/config

# ── packages: npm packages baked in at build time (their own stage, so changing the list keeps the rest cached)
FROM ${NODE_IMAGE} AS packages
# Space-separated npm specs, e.g. "@modelcontextprotocol/server-memory@2026.8.31 @notionhq/notion-mcp-server".
ARG MCP_NPM_PACKAGES=""
WORKDIR /out/packages
RUN --mount=type=cache,target=/root/.npm \
    echo '{"name":"baked-mcp-servers","private":true}' > package.json \
 && if [ -n "$MCP_NPM_PACKAGES" ]; then \
      npm install --omit=dev --no-audit --no-fund --no-update-notifier --save-exact $MCP_NPM_PACKAGES \
      && npm ls --omit=dev --depth=0; \
    fi

# ── full: Debian slim with npm/npx, python3, pip, pipx, for configs that need them at run time ──────────────
FROM ${NODE_IMAGE} AS full
# A CA bundle that the base image already has (e.g. for a TLS-inspecting registry mirror) survives the
# ca-certificates install, which rebuilds /etc/ssl/certs/ca-certificates.crt from the system's certificates.
RUN if [ -f /etc/ssl/certs/ca-certificates.crt ]; then \
      mkdir -p /usr/local/share/ca-certificates \
      && cp /etc/ssl/certs/ca-certificates.crt /usr/local/share/ca-certificates/base-image-bundle.crt; \
    fi \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      tini ca-certificates python3 python3-pip python3-venv pipx \
 && rm -rf /var/lib/apt/lists/*
# Python packages baked into /opt/venv (on PATH), e.g. "uv" for uvx, or "mcp-server-time". Needs PyPI at build time.
ARG MCP_PIP_PACKAGES=""
RUN python3 -m venv /opt/venv \
 && if [ -n "$MCP_PIP_PACKAGES" ]; then /opt/venv/bin/pip install --no-cache-dir $MCP_PIP_PACKAGES; fi
# Caches on the /cache volume, set in the tools' own config files: the proxy gives its children an
# allow-listed environment, so NPM_CONFIG_CACHE / PIP_CACHE_DIR in the image env would not reach them (nor
# would an NPM_CONFIG_CAFILE of the base image, for a registry behind a TLS-inspecting proxy: copied too).
RUN mkdir -p /cache/npm /cache/pip /cache/uv /data /config /etc/uv \
 && chown -R node:node /cache /data \
 && printf 'cache=/cache/npm\nupdate-notifier=false\nfund=false\naudit=false\n' > /usr/local/etc/npmrc \
 && if [ -n "${NPM_CONFIG_CAFILE:-}" ]; then echo "cafile=$NPM_CONFIG_CAFILE" >> /usr/local/etc/npmrc; fi \
 && printf '[global]\ncache-dir = /cache/pip\n' > /etc/pip.conf \
 && printf 'cache-dir = "/cache/uv"\n' > /etc/uv/uv.toml
COPY --from=builder /src/dist/proxy.js /app/dist/proxy.js
COPY --from=packages /out/packages /app/packages
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/data \
    MCP_PROXY_STATE_DIR=/data \
    MCP_PROXY_HOST=0.0.0.0 \
    MCP_PROXY_PORT=8080 \
    MCP_PROXY_CONFIG=/config/config.json \
    MCP_PROXY_PACKAGES_DIR=/app/packages
WORKDIR /app
USER node
VOLUME ["/data", "/cache"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["node", "/app/dist/proxy.js", "healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "node", "/app/dist/proxy.js"]
CMD []

# ── default: distroless, non-root (uid 65532), no shell ─────────────────────────────────────────────────────
FROM ${DISTROLESS_IMAGE} AS distroless
COPY --from=builder /usr/bin/tini-static /usr/bin/tini
COPY --from=builder /src/dist/proxy.js /app/dist/proxy.js
COPY --from=packages /out/packages /app/packages
COPY --from=builder /out/config /config
COPY --from=builder --chown=65532:65532 /out/data /data
# /nodejs/bin on PATH so that a config's "command": "node" resolves; HOME on the writable volume, so a server
# that writes under ~ (HOME is passed to children) does not hit the read-only root.
ENV PATH=/nodejs/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/data \
    MCP_PROXY_STATE_DIR=/data \
    MCP_PROXY_HOST=0.0.0.0 \
    MCP_PROXY_PORT=8080 \
    MCP_PROXY_CONFIG=/config/config.json \
    MCP_PROXY_PACKAGES_DIR=/app/packages
WORKDIR /app
USER 65532:65532
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/nodejs/bin/node", "/app/dist/proxy.js", "healthcheck"]
# tini reaps the orphans that MCP servers leave behind (npx → sh → node chains) and forwards SIGTERM to the
# proxy, which stops every child and exits 0. Arguments go to the proxy: `docker run IMAGE check`.
ENTRYPOINT ["/usr/bin/tini", "--", "/nodejs/bin/node", "/app/dist/proxy.js"]
CMD []
