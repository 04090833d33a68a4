# The CPU image: `cascade` on Debian slim, non-root, no model inside (the
# chart fetches artifacts from S3 or mounts them; for a baked image, COPY an
# artifact root to /artifacts in a derived image and set artifacts.source=image).
#   docker build -t cascade:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p cascade && cp target/release/cascade /cascade

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin cascade \
    && mkdir -p /artifacts /data && chown 10001:10001 /artifacts /data
COPY --from=build /cascade /usr/local/bin/cascade
USER 10001:10001
# gRPC and Prometheus metrics.
EXPOSE 50051 9464
ENV CASCADE_LISTEN=0.0.0.0:50051 CASCADE_METRICS_ADDR=0.0.0.0:9464 \
    CASCADE_ARTIFACT=/artifacts CASCADE_EVENT_LOG=/data/events.log
ENTRYPOINT ["/usr/local/bin/cascade"]
CMD ["serve"]
