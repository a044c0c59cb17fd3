# One image with tally's binaries: tally-server (API and sink), tally-operator,
# tally-agent and the kubectl plugin kubectl-tally. Build it from the repository root:
#   docker build -t tally:0.1.0 .
# The operator is told the image with --agent-image (the chart does this), and runs the
# agents from it too.

FROM rust:1.89-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake perl \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# kafka-tls: librdkafka with a vendored OpenSSL, for TLS and SCRAM to a secured Kafka.
RUN cargo build --release --locked -p tally-server --bin tally-server \
      -p tally-operator -p tally-kubectl --features tally-kafka/kafka-tls \
 && cargo build --profile agent --locked -p tally-agent \
 && mkdir -p /out \
 && cp target/release/tally-server target/release/tally-operator target/release/kubectl-tally target/agent/tally-agent /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin tally
COPY --from=build /out/ /usr/local/bin/
# Non-root by default; the node agent's DaemonSet sets uid 0 itself (it reads the
# kubelet's root-owned 0640 log files, with every capability dropped).
USER 65532:65532
EXPOSE 8080
ENTRYPOINT []
CMD ["tally-server", "--help"]
