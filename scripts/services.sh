#!/usr/bin/env bash
# Installs (when missing) and runs the services the tests need, on loopback only:
#   tansu (Kafka API) on 127.0.0.1:9092, ClickHouse 18.16 on 127.0.0.1:8123 (HTTP) / 9000,
#   and ClickHouse 26.9 (the engine of PyPI's chdb-core, scripts/clickhouse26.py) on
#   127.0.0.1:8124 (HTTP) / 9124.
# PID files and logs live under $SERVICES_DIR (default ./.services, git-ignored).
#   scripts/services.sh start | stop | status | install | clickhouse-config DIR HTTP_PORT TCP_PORT
set -euo pipefail

TOOLS="${TALLY_TOOLS:-$HOME/.cache/tally-tools}"
DIR="${SERVICES_DIR:-$(pwd)/.services}"
KAFKA_PORT="${TALLY_KAFKA_PORT:-9092}"
CH_HTTP_PORT="${TALLY_CH_HTTP_PORT:-8123}"
CH_TCP_PORT="${TALLY_CH_TCP_PORT:-9000}"
CH26_HTTP_PORT="${TALLY_CH26_HTTP_PORT:-8124}"
CH26_TCP_PORT="${TALLY_CH26_TCP_PORT:-9124}"
CHDB_VERSION=26.9.0
CHDB_PYTHON="$TOOLS/chdb-venv/bin/python"
SCRIPTS="$(cd "$(dirname "$0")" && pwd)"
export PATH="$TOOLS/bin:$PATH"

install() {
  if ! command -v tansu >/dev/null; then
    echo "installing tansu 0.6.0 into $TOOLS (about 10 minutes on 2 cores, once per machine)"
    CARGO_TARGET_DIR="$HOME/.cache/tansu-build" cargo install tansu@0.6.0 --locked \
      --no-default-features --features dynostore,libsql --root "$TOOLS"
  fi
  if ! command -v clickhouse-server >/dev/null; then
    echo "installing clickhouse-server and clickhouse-client from Debian"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clickhouse-server clickhouse-client
  fi
  if [ ! -f /usr/share/java/zookeeper.jar ]; then
    echo "installing zookeeper 3.8 from Debian (the replicated ClickHouse test runs its own)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zookeeper
  fi
  if ! "$CHDB_PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('chdb-core') != '$CHDB_VERSION')" 2>/dev/null; then
    echo "installing chdb-core $CHDB_VERSION (ClickHouse 26.9) into $TOOLS/chdb-venv (about a minute, once per machine)"
    python3 -m venv "$TOOLS/chdb-venv"
    "$TOOLS/chdb-venv/bin/pip" install -q "chdb-core==$CHDB_VERSION"
  fi
}

# Writes a private ClickHouse config (config.xml + users.xml) into $1.
clickhouse_config() {
  local d="$1" http="$2" tcp="$3"
  mkdir -p "$d/data" "$d/tmp" "$d/log"
  cat >"$d/config.xml" <<XML
<yandex>
  <logger><level>warning</level><log>$d/log/server.log</log><errorlog>$d/log/error.log</errorlog><console>0</console></logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>$http</http_port>
  <tcp_port>$tcp</tcp_port>
  <path>$d/data/</path>
  <tmp_path>$d/tmp/</tmp_path>
  <users_config>$d/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>100</max_concurrent_queries>
  <mlock_executable>false</mlock_executable>
</yandex>
XML
  cat >"$d/users.xml" <<XML
<yandex>
  <profiles><default>
    <allow_experimental_low_cardinality_type>1</allow_experimental_low_cardinality_type>
    <max_execution_time>300</max_execution_time>
    <max_memory_usage>4000000000</max_memory_usage>
  </default></profiles>
  <users><default>
    <password></password>
    <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
    <profile>default</profile><quota>default</quota>
  </default></users>
  <quotas><default></default></quotas>
</yandex>
XML
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
  install
  mkdir -p "$DIR/tansu" "$DIR/clickhouse" "$DIR/clickhouse26"
  if running "$DIR/tansu.pid"; then echo "tansu already running (pid $(cat "$DIR/tansu.pid"))";
  elif port_open "$KAFKA_PORT"; then echo "port $KAFKA_PORT is already served (not started from $DIR); using it";
  else
    # `cd` first and alone, so $! is tansu's own PID (the one `stop` kills)
    (cd "$DIR/tansu" || exit 1
     nohup tansu broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine sqlite://tansu.db \
      >"$DIR/tansu.log" 2>&1 &
     echo $! >"$DIR/tansu.pid")
  fi
  if running "$DIR/clickhouse.pid"; then echo "clickhouse already running (pid $(cat "$DIR/clickhouse.pid"))";
  elif port_open "$CH_HTTP_PORT"; then echo "port $CH_HTTP_PORT is already served (not started from $DIR); using it";
  else
    clickhouse_config "$DIR/clickhouse" "$CH_HTTP_PORT" "$CH_TCP_PORT"
    nohup /usr/sbin/clickhouse-server --config-file="$DIR/clickhouse/config.xml" \
      >"$DIR/clickhouse.log" 2>&1 & echo $! >"$DIR/clickhouse.pid"
  fi
  if running "$DIR/clickhouse26.pid"; then echo "clickhouse 26.9 already running (pid $(cat "$DIR/clickhouse26.pid"))";
  elif port_open "$CH26_HTTP_PORT"; then echo "port $CH26_HTTP_PORT is already served (not started from $DIR); using it";
  else
    nohup "$CHDB_PYTHON" "$SCRIPTS/clickhouse26.py" "$DIR/clickhouse26" "$CH26_HTTP_PORT" "$CH26_TCP_PORT" \
      >"$DIR/clickhouse26.log" 2>&1 & echo $! >"$DIR/clickhouse26.pid"
  fi
  for _ in $(seq 1 300); do
    if curl -sf "http://127.0.0.1:$CH_HTTP_PORT/ping" >/dev/null && port_open "$KAFKA_PORT" \
      && curl -sf "http://127.0.0.1:$CH26_HTTP_PORT/ping" >/dev/null; then
      echo "services up: kafka 127.0.0.1:$KAFKA_PORT, clickhouse 18.16 http://127.0.0.1:$CH_HTTP_PORT, clickhouse 26.9 http://127.0.0.1:$CH26_HTTP_PORT (logs in $DIR)"
      return 0
    fi
    sleep 0.2
  done
  echo "services did not come up; see $DIR/tansu.log, $DIR/clickhouse.log and $DIR/clickhouse26.log" >&2
  exit 1
}

stop() {
  for s in tansu clickhouse clickhouse26; do
    if running "$DIR/$s.pid"; then
      kill "$(cat "$DIR/$s.pid")"
      for _ in $(seq 1 50); do running "$DIR/$s.pid" || break; sleep 0.1; done
      running "$DIR/$s.pid" && kill -9 "$(cat "$DIR/$s.pid")"
      echo "stopped $s"
    fi
    rm -f "$DIR/$s.pid"
  done
}

status() {
  for s in tansu clickhouse clickhouse26; do
    if running "$DIR/$s.pid"; then echo "$s: running (pid $(cat "$DIR/$s.pid"))"; else echo "$s: stopped"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  install) install ;;
  clickhouse-config) clickhouse_config "$2" "$3" "$4" ;;
  *) echo "usage: $0 start|stop|status|install|clickhouse-config DIR HTTP_PORT TCP_PORT" >&2; exit 2 ;;
esac
