# syntax=docker/dockerfile:1
# The agent-bus image: the `dispatcher` (all roles) and the `runner`. Every task pod the
# dispatcher launches starts an init container of this same image that runs
#   /usr/local/bin/runner install /agent-bus/bin
# (the runner copies itself into an emptyDir the task's container then runs it from).
#
#   docker build -t agent-bus:dev .
#   docker run --rm -p 8080:8080 agent-bus:dev            # embedded defaults: SQLite, local executor
#
# The dispatcher is built on Debian bookworm and runs on bookworm (the glibc it was linked
# against). The runner is built against glibc 2.31 with cargo-zigbuild, so it also runs in
# old user images (Ubuntu 20.04 CUDA and PyTorch images, Debian 11).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
# The base images, as build arguments: where no registry is reachable (the test suite),
# they are made locally from Debian's packages (tests/env/image, docs/DOCKER.md).
ARG BUILD_IMAGE=rust:${RUST_VERSION}-${DEBIAN_RELEASE}
ARG RUNTIME_IMAGE=debian:${DEBIAN_RELEASE}-slim
# Where the runtime stage takes /out/dispatcher and /out/runner from: the build stage
# below, or an image that already holds them (the test suite passes one made of the
# binaries its own build produced, so the workspace is not compiled twice; the build
# stage is then skipped as unused).
ARG BINARIES=build

# --- build ---------------------------------------------------------------------------
FROM ${BUILD_IMAGE} AS build
# ziglang and cargo-zigbuild from PyPI, in a venv (bookworm's Python refuses a system-wide
# pip install); the versions tests/env/versions.env pins for tests/env/build-runner, which
# builds the same runner for the test suite (a test keeps the two equal).
ARG ZIGLANG_VERSION=0.17.0
ARG CARGO_ZIGBUILD_VERSION=0.24.0
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/zigbuild \
    && /opt/zigbuild/bin/pip install --no-cache-dir "ziglang==${ZIGLANG_VERSION}" "cargo-zigbuild==${CARGO_ZIGBUILD_VERSION}"
ENV PATH=/opt/zigbuild/bin:${PATH}
WORKDIR /src
# The whole workspace (the test crates under tests/ are members, so cargo needs them to
# load the workspace);
# .dockerignore keeps everything else out. The cache mounts keep the registry, the target
# folder and zig's cache between builds.
COPY Cargo.toml Cargo.lock ./
COPY cli cli
COPY dispatcher dispatcher
COPY protocol protocol
COPY runner runner
COPY tests/benchmark tests/benchmark
COPY tests/client tests/client
COPY tests/deploy tests/deploy
COPY tests/support tests/support
# The runner's target is the build machine's architecture with a glibc version suffix:
# x86_64-unknown-linux-gnu.2.31 on amd64 (the only one tested).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    --mount=type=cache,target=/root/.cache \
    cargo build --release --locked -p dispatcher --bin dispatcher \
    && runner_target="$(uname -m)-unknown-linux-gnu" \
    && cargo zigbuild --release --locked -p runner --target "${runner_target}.2.31" \
    && install -D -m 0755 target/release/dispatcher /out/dispatcher \
    && install -D -m 0755 "target/${runner_target}/release/runner" /out/runner

FROM ${BINARIES} AS binaries

# --- runtime -------------------------------------------------------------------------
# debian-slim rather than distroless: the image's default, the local executor (docker run,
# docker compose), runs task commands inside this container, which needs a shell and
# coreutils. On Kubernetes nothing here needs them (see docs/DOCKER.md).
FROM ${RUNTIME_IMAGE} AS runtime
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
COPY --from=binaries /out/dispatcher /usr/local/bin/dispatcher
COPY --from=binaries /out/runner /usr/local/bin/runner
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
