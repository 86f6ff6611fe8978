# CPU image of the hindsight services. One image holds all four binaries:
#   hir             the command line (migrations, health probe, local tools)
#   hir-generator   gRPC sampler (port 50051, metrics 9451)
#   hir-relabeler   gRPC relabeler (port 50052, metrics 9452)
#   hir-trainer     gRPC trainer (port 50053, metrics 9453)
#
#   docker build -t hindsight:latest .
#
# The CUDA image is deploy/Dockerfile.cuda.

# Keep RUST_VERSION equal to the channel in rust-toolchain.toml (scripts/validate-deploy
# checks this). rust-toolchain.toml itself is left out of the build context
# (.dockerignore), so rustup inside the image never downloads a second toolchain or the
# rustfmt/clippy components that only development needs.
ARG RUST_VERSION=1.95.0
ARG CARGO_CHEF_VERSION=0.1.77

# Where the runtime stage takes the four binaries from: the `builder` stage below (the
# default), or an image that holds them in /out/ (scripts/compose-smoke imports the
# binaries it built on the host as one, where no Rust image can be pulled). BuildKit
# builds only the stages the target needs, so the build stages are then skipped.
ARG HIR_BINARIES=builder

# ---------------------------------------------------------------------------------------
# chef: the Rust toolchain plus cargo-chef, which splits the build into a dependency
# layer (cached until a manifest or Cargo.lock changes) and the workspace's own crates.
FROM rust:${RUST_VERSION}-bookworm AS chef
ARG CARGO_CHEF_VERSION
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /src

# planner: reduces the workspace to its manifests and lockfile (recipe.json).
FROM chef AS planner
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY tests tests
RUN cargo chef prepare --recipe-path recipe.json

# builder: dependencies first (from the recipe only), then the real sources.
FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --recipe-path recipe.json
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY tests tests
# hir-proto's build script compiles proto/; hir-store embeds migrations/ at compile time.
COPY proto proto
COPY migrations migrations
RUN cargo build --release --locked --workspace --bins \
 && mkdir -p /out \
 && cp target/release/hir target/release/hir-generator \
       target/release/hir-relabeler target/release/hir-trainer /out/

# binaries: the builder's output, or the image named by HIR_BINARIES.
FROM ${HIR_BINARIES} AS binaries

# ---------------------------------------------------------------------------------------
# runtime: the binaries, the migrations and the BIG-bench tasks, run as a non-root user.
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid/gid, so Kubernetes can check runAsNonRoot against the image.
# Service directories are owned by that user: a fresh named volume mounted on one of them
# inherits the ownership, so Compose volumes need no chown step.
ARG HIR_UID=10001
RUN groupadd --system --gid "${HIR_UID}" hindsight \
 && useradd --system --uid "${HIR_UID}" --gid hindsight --home-dir /var/lib/hindsight \
        --no-create-home --shell /usr/sbin/nologin hindsight \
 && mkdir -p /opt/hindsight /models /checkpoints \
        /var/lib/hindsight/staging /var/lib/hindsight/trainer \
 && chown -R hindsight:hindsight /checkpoints /var/lib/hindsight

COPY --from=binaries /out/ /usr/local/bin/
COPY migrations /opt/hindsight/migrations
COPY data/bigbench /opt/hindsight/data/bigbench

# The services look for data/bigbench relative to the working directory by default.
WORKDIR /opt/hindsight
USER ${HIR_UID}:${HIR_UID}
EXPOSE 50051 50052 50053 9451 9452 9453
# No ENTRYPOINT: each service names its binary, e.g.
#   docker run --rm hindsight:latest hir-generator --config /etc/hindsight/generator.toml
CMD ["hir", "--help"]
