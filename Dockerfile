# syntax=docker/dockerfile:1
# The agent-bus image: the `dispatcher` (all roles) and the `runner`, which the dispatcher
# copies into every task pod from an init container of this same image:
#   cp /usr/local/bin/runner /agent-bus/bin/runner
#
#   docker build -t agent-bus:dev .
#   docker run --rm -p 8080:8080 agent-bus:dev            # embedded defaults: SQLite, local executor
#
# Both stages are Debian bookworm, so the binaries link against the glibc they run with.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# --- build ---------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# The whole workspace (tests/support is a member, so cargo needs it to load the workspace);
# .dockerignore keeps everything else out. The cache mounts keep the registry and the
# target folder between builds.
COPY Cargo.toml Cargo.lock ./
COPY dispatcher dispatcher
COPY protocol protocol
COPY runner runner
COPY tests/support tests/support
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p dispatcher --bin dispatcher -p runner --bin runner \
    && install -D -m 0755 target/release/dispatcher /out/dispatcher \
    && install -D -m 0755 target/release/runner /out/runner

# --- runtime -------------------------------------------------------------------------
# debian-slim rather than distroless: the runner init container needs `cp`.
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="agent-bus" \
      org.opencontainers.image.description="agent-bus dispatcher and runner" \
      org.opencontainers.image.source="https://github.com/agent-bus/agent-bus" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 agent-bus \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /var/lib/agent-bus --shell /usr/sbin/nologin agent-bus \
    && install -d -o 65532 -g 65532 -m 0750 /var/lib/agent-bus
COPY --from=build /out/dispatcher /usr/local/bin/dispatcher
COPY --from=build /out/runner /usr/local/bin/runner
# The embedded default keeps its SQLite file and local work folder here.
WORKDIR /var/lib/agent-bus
USER 65532:65532
ENV AGENT_BUS_LISTEN=0.0.0.0:8080
EXPOSE 8080
# No shell, curl or wget needed: the dispatcher asks its own /readyz.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/dispatcher", "healthcheck", "--url", "http://127.0.0.1:8080/readyz"]
ENTRYPOINT ["/usr/local/bin/dispatcher"]
CMD ["serve"]
