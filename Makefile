# The few verbs a newcomer needs. Everything installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint venv sysdeps sysdeps-cluster clean
.PHONY: cluster

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python
	$(BIN)/pip install -q -e '.[server,dev,speed]'

## make run: install and run one node with the embedded broker on http://127.0.0.1:8080
run: $(BIN)/python
	$(BIN)/pip install -q -e '.[server,speed]'
	$(BIN)/hubnode --host 127.0.0.1 --port 8080 --presence-rooms '*'

## make test: install what the tests need (system packages too) and run the suite
test: sysdeps venv
	HUB_TEST_REQUIRE_ALL=1 $(BIN)/python -m pytest -q

## system packages the tests start for real (idempotent): redis-server, nginx, chromium, Node.js
## with npm (docs/redis.md's Node.js example and the benchmark's load clients), and Ruby with its
## redis and msgpack gems (docs/redis.md's Ruby example)
sysdeps: sysdeps-cluster
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }
	@{ command -v node && command -v npm; } >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nodejs npm; }
	@ruby -e 'require "redis"; require "msgpack"' >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq ruby ruby-redis ruby-msgpack; }

## what `make cluster` runs besides the nodes: redis-server and nginx (idempotent)
sysdeps-cluster:
	@command -v redis-server >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server; }
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && { DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nginx-light || \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nginx; }; }

## make cluster: redis-server, three nodes and nginx on http://127.0.0.1:8080, no Docker; Ctrl-C stops them.
## Installs only what it runs: redis-server and nginx (apt, when missing) and the node (.[server,speed]).
## A process that dies is reported and restarted (--restart on-failure; --restart no keeps it down).
## Redis listens on 6380 (--redis-port 0: a free port). Flags after -- go to every node:
## make cluster CLUSTER_ARGS="--port 9000 --nodes 5 --restart no -- --heartbeat 1"
## --redis cluster: a Redis Cluster, 3 primaries + 3 replicas on 7001-7006 (nodes get redis+cluster://...);
## --redis sentinel: primary 6380, replica 6381, sentinels 26380-26382 (redis+sentinel://.../hubmaster):
## make cluster CLUSTER_ARGS="--redis cluster"
cluster: sysdeps-cluster $(BIN)/python
	$(BIN)/pip install -q -e '.[server,speed]'
	$(BIN)/python -m deploy.cluster $(CLUSTER_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info

.PHONY: bench bench-full

## make bench: a short benchmark, hubnode (history off and on) vs python-socketio vs Node.js Socket.IO vs bare asyncio (bench/out/RESULTS-quick.md)
bench: $(BIN)/python
	@command -v redis-server >/dev/null 2>&1 || $(MAKE) sysdeps
	$(BIN)/pip install -q -e '.[server,speed,bench]'
	$(BIN)/python -m bench

## make bench-full: the full benchmark; rewrites bench/RESULTS.md (several minutes)
bench-full: $(BIN)/python
	@command -v redis-server >/dev/null 2>&1 || $(MAKE) sysdeps
	$(BIN)/pip install -q -e '.[server,speed,bench]'
	$(BIN)/python -m bench --full
