#!/usr/bin/env python3
"""ClickHouse 26.9 on loopback, from the engine in PyPI's chdb-core (pinned 26.9.0).

    clickhouse26.py DATA_DIR HTTP_PORT TCP_PORT

Runs in the foreground until SIGTERM/SIGINT (then stops cleanly) or SIGKILL (the data
dir survives: start it again on the same dir and ports). Prints
`clickhouse 26.9 listening on addr=127.0.0.1:PORT` once it answers.

chdb's own sessions cannot open listeners, but its low-level `_chdb.query` runs a full
clickhouse-local for the duration of one call, and clickhouse-local can start
ClickHouse's own HTTP and native handlers (`SYSTEM START LISTEN`). That call reads
`config.xml` from the current directory. So: write the config, chdir there, and keep
one query running in a thread; to stop, kill that query through the server's own port.
"""
import fcntl
import os
import signal
import sys
import threading
import time
import urllib.request

TAG = "tally_keepalive_8f3c"


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    data, http, tcp = os.path.abspath(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    os.makedirs(data, exist_ok=True)
    # one engine per data dir: a second one would corrupt it
    lock = open(os.path.join(data, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(f"clickhouse26: {data} is in use by another process", file=sys.stderr)
        return 1

    import chdb  # noqa: F401  (loading it changes the working directory)
    from chdb import _chdb

    conf = os.path.join(data, "conf")
    os.makedirs(conf, exist_ok=True)
    with open(os.path.join(conf, "config.xml"), "w") as f:
        f.write(
            "<clickhouse>"
            "<listen_host>127.0.0.1</listen_host>"
            f"<http_port>{http}</http_port><tcp_port>{tcp}</tcp_port>"
            "<max_server_memory_usage>2000000000</max_server_memory_usage>"
            "<timezone>UTC</timezone>"
            "</clickhouse>"
        )
    os.chdir(conf)
    store = os.path.join(data, "store")
    failed = []

    def serve() -> None:
        try:
            _chdb.query(
                "SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; "
                f"SELECT sleepEachRow(1), '{TAG}' FROM numbers(1000000000000) "
                "SETTINGS max_block_size=1, max_execution_time=0 FORMAT Null",
                # also the HTTP handler's default output format: a server's default
                "TabSeparated",
                path=store,
            )
        except Exception as e:  # the engine's own error, e.g. a port in use
            failed.append(str(e))

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    url = f"http://127.0.0.1:{http}/"

    def ask(sql: str, timeout: float = 5) -> str:
        req = urllib.request.Request(url, data=sql.encode())
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read().decode()

    deadline = time.time() + 60
    while True:
        if failed or not worker.is_alive():
            print(f"clickhouse26: the engine stopped: {failed}", file=sys.stderr)
            return 1
        try:
            # ours: the keep-alive query is running in it
            if ask(f"SELECT count() FROM system.processes WHERE query LIKE '%{TAG}%' "
                   "AND query NOT LIKE '%system.processes%'").strip() != "0":
                break
        except OSError:
            pass
        if time.time() > deadline:
            print("clickhouse26: not answering after 60 s", file=sys.stderr)
            return 1
        time.sleep(0.1)
    version = ask("SELECT version() FORMAT TabSeparated").strip()
    print(f"clickhouse {version} listening on addr=127.0.0.1:{http}", flush=True)

    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    while not stop.is_set() and worker.is_alive():
        stop.wait(0.5)
    if worker.is_alive():
        try:
            ask(f"KILL QUERY WHERE query LIKE '%{TAG}%' SYNC", timeout=30)
        except OSError as e:
            print(f"clickhouse26: stopping: {e}", file=sys.stderr)
        worker.join(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
