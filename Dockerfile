# syntax=docker/dockerfile:1
#
# Container image for seldon-auth-proxy: builds the release binary from the
# locked dependency set (Cargo.lock) and ships it on a distroless base that has
# no shell, no package manager and no compiler, running as uid 65532.
#
#   docker build -t seldon-auth-proxy:0.1.0 .
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.
# For reproducible production builds, pin both base images by digest
# (FROM image:tag@sha256:...) and bump the digests deliberately.

# ---------------------------------------------------------------------------
# Build stage. Debian bookworm, so the glibc it links against matches the
# runtime stage below (distroless cc-debian12 is bookworm too). The binary
# uses rustls, so no OpenSSL headers or libraries are needed; the slim image
# already has the C compiler that `ring` needs.
# ---------------------------------------------------------------------------
FROM rust:1-slim-bookworm AS builder
WORKDIR /src

# The whole build context (filtered by .dockerignore) is copied so that every
# target Cargo.toml declares is present. Rebuilds stay fast anyway: the
# registry and target directories live in BuildKit cache mounts, so only the
# crate's own code is recompiled when sources change.
COPY . .

# --locked: fail instead of silently re-resolving when Cargo.lock is stale.
# The target dir is a cache mount (not part of the layer), so the binary is
# copied out to /out inside the same RUN.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git/db \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin seldon-auth-proxy \
 && mkdir -p /out \
 && cp target/release/seldon-auth-proxy /out/seldon-auth-proxy

# ---------------------------------------------------------------------------
# Runtime stage: glibc + libgcc + CA certificates, nothing else. The
# `nonroot` tag already runs as uid/gid 65532; USER repeats it numerically so
# Kubernetes `runAsNonRoot` can verify it without trusting the base image.
# ---------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/seldon-auth-proxy /usr/local/bin/seldon-auth-proxy
USER 65532:65532

# 8080: the proxy listener. Anyone who can reach it calls the platform with
# this proxy's credential, so by default it binds 127.0.0.1 only, and that
# stays true inside a container. Loopback in a container is the container's
# own network namespace:
#   * Kubernetes: containers of one pod share it, so an app container reaches
#     the sidecar at http://127.0.0.1:8080 with no change (see deploy/).
#   * Docker: `docker run --network container:<app>` shares the app
#     container's namespace the same way; prefer this.
#   * Publishing with -p does NOT work with the default, because Docker
#     forwards published ports to the container's eth0 address, not its
#     loopback. Only if you must publish, set BOTH
#       SELDON_AUTH_PROXY_LISTEN=0.0.0.0:8080
#       SELDON_AUTH_PROXY_ALLOW_NON_LOOPBACK=true
#     and publish on the host's loopback only: -p 127.0.0.1:8080:8080.
#     Never `-p 8080:8080` (that publishes on every host interface). Even
#     with 127.0.0.1 on the host side, other containers on the same Docker
#     network can reach the container's 0.0.0.0:8080 directly: run it on a
#     network of its own, or require a caller token (inbound_token_file).
# 9090: admin listener (/healthz, /readyz, /metrics; no credentials). It also
#   defaults to 127.0.0.1:9090; set SELDON_AUTH_PROXY_ADMIN_LISTEN=[::]:9090
#   when probes or Prometheus must reach it from outside the container.
# EXPOSE is documentation only; it opens nothing.
EXPOSE 8080 9090

# No HEALTHCHECK: the image has no shell or curl; use orchestrator probes on
# the admin port instead. Subcommands: serve (default), check, token, login,
# dev; e.g. `docker run --rm -e ... seldon-auth-proxy:0.1.0 check`.
ENTRYPOINT ["/usr/local/bin/seldon-auth-proxy"]
CMD ["serve"]
