# syntax=docker/dockerfile:1
#
# qpq-server (and the qpq CLI) in a slim Debian image:
#
#   docker build -t qpq-server --build-arg QPQ_BUILD_COMMIT=$(git rev-parse HEAD) .
#   docker run -d --name qpq -p 7443:7443/udp -v qpq-data:/data qpq-server
#   docker logs qpq            # the certificate fingerprint clients pin
#
# The server runs as an unprivileged user (uid 10001) with its state in
# the /data volume: the database and, unless tls_cert/tls_key are set, the
# generated certificate, so keep the volume or clients must be given a new
# fingerprint. Settings come from QPQ_* variables (`docker run -e ...`) or
# a file mounted over /etc/qpq/qpq-server.toml. compose.yaml runs it, alone
# or on PostgreSQL; packaging/docker-check.sh checks this file's steps.

# The Debian release of both stages: the binaries are linked against the
# build stage's glibc, so the runtime stage must not be older.
ARG DEBIAN_RELEASE=bookworm
# The toolchain CI builds and tests with (the workspace needs 1.89 or newer).
ARG RUST_VERSION=1.95

# ---------------------------------------------------------------- build ---
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
# The workspace: its manifests, every member (cargo loads them all to
# resolve), the vendored MLS crates of [patch.crates-io] and the build
# scripts' shared code. Nothing else is needed to build.
COPY Cargo.toml Cargo.lock ./
COPY build-support build-support
COPY vendor vendor
COPY core-sm core-sm
COPY io-shell io-shell
COPY sim sim
COPY benches benches
COPY interop interop
# There is no .git here: the commit `--version` names comes from the
# build argument (`docker build --build-arg QPQ_BUILD_COMMIT=$(git
# rev-parse HEAD) .`), and is `unknown` without it.
ARG QPQ_BUILD_COMMIT=
# The registry and target/ are cache mounts, so a rebuild after a source
# change compiles only what changed; the binaries are copied out of the
# mount into /out.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p quicproquo-server -p quicproquo-client --bin qpq-server --bin qpq \
    && mkdir -p /out \
    && cp target/release/qpq-server target/release/qpq /out/

# -------------------------------------------------------------- runtime ---
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# The unprivileged user the server runs as, with the data directory as its
# home; a fixed uid so a bind-mounted /data can be chowned to it
# (`chown -R 10001:10001 DIR`). A named volume takes /data's owner from
# the image.
RUN groupadd --system --gid 10001 qpq \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin qpq \
    && install -d -o 10001 -g 10001 -m 0700 /data
COPY --from=build /out/qpq-server /out/qpq /usr/local/bin/
# The documented configuration with every key at its default, so the file
# changes nothing until an operator mounts their own over it. QPQ_*
# variables win over it, the three below included: the data directory and
# the listen address of a mounted file are overridden unless those are
# set again with `docker run -e`.
COPY qpq-server.toml /etc/qpq/qpq-server.toml
ENV QPQ_CONFIG=/etc/qpq/qpq-server.toml \
    QPQ_DATA_DIR=/data \
    QPQ_LISTEN=0.0.0.0:7443
WORKDIR /data
USER 10001:10001
VOLUME ["/data"]
# QUIC. The metrics endpoint (QPQ_METRICS_LISTEN, off by default) is
# plain HTTP without authentication: publish it only to a trusted network.
EXPOSE 7443/udp
# SIGTERM stops the server cleanly within 5 s (waiting long-polls are
# answered at once, other requests finish or are cut), synced, exit 0.
# Give `docker stop` more than that (-t 30, as compose.yaml's
# stop_grace_period does).
STOPSIGNAL SIGTERM
# `qpq-server health` reads the same configuration, connects over QUIC to
# the listen address (0.0.0.0 as 127.0.0.1), pins the certificate in the
# data directory and sends one cheap request: 0 if it was answered.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --start-interval=2s --retries=3 \
    CMD ["qpq-server", "health"]
ENTRYPOINT ["qpq-server"]
