# Multi-stage build: compile in the Rust image, run from a slim Debian with only CA certificates.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock clippy.toml ./
# Dependencies first, against placeholder sources, so that a change to our own code rebuilds
# only this crate: the layer below stays cached until Cargo.toml or Cargo.lock change.
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/routing.rs \
    && cargo build --release --locked --bin routellm \
    && rm -rf src benches target/release/routellm target/release/deps/routellm-* \
        target/release/deps/libroutellm-* target/release/.fingerprint/routellm-*
COPY src src
COPY benches benches
COPY tests tests
RUN cargo build --release --locked --bin routellm

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin routellm \
    && install -d -o routellm -g routellm /var/lib/routellm
WORKDIR /app
COPY --from=build /src/target/release/routellm /usr/local/bin/routellm
COPY routers /app/routers
COPY config.example.yaml /app/config.example.yaml
USER routellm
ENV ROUTELLM_HOST=0.0.0.0 \
    ROUTELLM_PORT=6060 \
    ROUTELLM_ROUTERS_DIR=/app/routers
EXPOSE 6060
# The binary asks its own /health (the image has no curl), at the port the environment or
# --config name; `docker ps` then shows healthy, and compose can wait on it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["routellm", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["routellm"]
CMD ["serve"]
