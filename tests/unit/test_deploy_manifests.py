"""deploy/: compose.yaml, the k8s manifests, the Dockerfile and nginx.conf agree with hubnode itself.

Names, ports and paths are read from the code (Config fields, the app's
routes, the console scripts), never copied into the test, so a renamed flag
or route fails here before it fails in a cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

import hubnode
from deploy.cluster import find_executable, free_port, nginx_command, nginx_version, render_nginx_conf
from hubnode.app import create_app
from hubnode.config import Config, parse_args
from tests.helpers import missing

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NODE_SERVICES = ("node1", "node2", "node3")
ENV_NAMES = {"HUB_" + f.name.upper() for f in fields(Config)}


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def k8s() -> dict[str, dict[str, Any]]:
    """The manifests listed by kustomization.yaml, by kind."""
    listed = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["resources"]
    docs = [doc for name in listed for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text())]
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs), "one manifest per kind expected"
    return by_kind


def container() -> dict[str, Any]:
    spec = k8s()["Deployment"]["spec"]["template"]["spec"]
    (only,) = spec["containers"]
    return dict(only)


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def nginx_conf() -> str:
    return (DEPLOY / "nginx.conf").read_text()


def interpolate(value: Any) -> str:
    """Compose's `${VAR:-default}` with the variable unset: the default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def compose_env(service: str) -> dict[str, str]:
    env = compose()["services"][service]["environment"]
    return {k: interpolate(v) for k, v in env.items()}


def k8s_env() -> dict[str, str]:
    """What a pod sees: the ConfigMap, then the container's own env (stand-ins for references)."""
    env = {k: str(v) for k, v in k8s()["ConfigMap"]["data"].items()}
    for item in container()["env"]:
        env[item["name"]] = item.get("value", "redis://redis.example:6379/0" if "REDIS" in item["name"] else "x-1")
    return env


def routes() -> set[str]:
    return {r.canonical for r in create_app(Config(node_id="manifest-test")).router.resources()}


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text.strip())
    assert match, text
    return float(match[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match[2]]


def test_manifests_parse() -> None:
    """compose.yaml and every k8s manifest are YAML with the expected services and kinds; the Redis Cluster
    and Sentinel services are only in their profiles, so a plain `up` is one Redis, nginx and the nodes."""
    services = compose()["services"]
    assert {name for name, s in services.items() if "profiles" not in s} == {"redis", "nginx", *NODE_SERVICES}
    assert {p for s in services.values() for p in s.get("profiles", [])} == {"cluster", "sentinel"}
    assert set(k8s()) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}


def test_one_image_name_tagged_with_the_version() -> None:
    """Compose nodes and the k8s Deployment run the same image, tagged with hubnode's version."""
    images = {compose()["services"][s]["image"] for s in NODE_SERVICES} | {container()["image"]}
    assert images == {f"hubnode:{hubnode.__version__}"}
    assert f"-t hubnode:{hubnode.__version__}" in dockerfile()


def test_env_names_are_cli_flags() -> None:
    """Every HUB_* variable in compose, k8s and the Dockerfile is a hubnode flag's variable."""
    used = set(compose_env("node1")) | set(k8s_env()) | set(re.findall(r"\b(HUB_[A-Z_]+)=", dockerfile()))
    assert used <= ENV_NAMES, used - ENV_NAMES
    assert {"HUB_REDIS_URL", "HUB_NODE_ID", "HUB_HOST"} <= used


@pytest.mark.parametrize("where", [*NODE_SERVICES, "k8s"])
def test_env_makes_a_node_that_starts(where: str) -> None:
    """The environment parses into a Config that passes the exposure check on 0.0.0.0."""
    env = k8s_env() if where == "k8s" else compose_env(where)
    config = parse_args([], env=env)
    assert config.host == "0.0.0.0" and not config.on_loopback
    config.check_exposure()  # a node on a public address refuses anonymous mode without the flag
    assert config.redis_url is not None and config.api_key
    if where != "k8s":
        assert config.node_id == where


def test_node_ids_are_distinct() -> None:
    """Each compose node has its own HUB_NODE_ID; k8s takes the pod name."""
    assert sorted(compose_env(s)["HUB_NODE_ID"] for s in NODE_SERVICES) == sorted(NODE_SERVICES)
    node_id = next(e for e in container()["env"] if e["name"] == "HUB_NODE_ID")
    assert node_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_ports_agree() -> None:
    """Node port, nginx upstreams, published port, containerPort, targetPort and EXPOSE are one story."""
    port = int(compose_env("node1")["HUB_PORT"])
    services = compose()["services"]
    assert all(str(port) in map(str, services[s]["expose"]) for s in NODE_SERVICES)
    upstreams = re.findall(r"^\s*server (\S+?):(\d+)\b", nginx_conf(), re.M)
    assert upstreams == [(s, str(port)) for s in NODE_SERVICES]
    listen = re.search(r"^\s*listen (\d+);", nginx_conf(), re.M)
    assert listen and services["nginx"]["ports"] == [f"{listen[1]}:{listen[1]}"]
    (ctr_port,) = container()["ports"]
    assert ctr_port["containerPort"] == int(k8s_env()["HUB_PORT"]) == port
    assert k8s()["Service"]["spec"]["ports"][0]["targetPort"] == ctr_port["name"]
    assert re.search(rf"^EXPOSE {port}$", dockerfile(), re.M)
    assert re.search(rf"HUB_PORT={port}\b", dockerfile())


def test_probe_paths_are_hubnode_routes() -> None:
    """Readiness uses /readyz and liveness /healthz, both real routes; so do the Docker healthchecks."""
    known = routes()
    ctr = container()
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/readyz" in known
    assert ctr["livenessProbe"]["httpGet"]["path"] == "/healthz" in known
    assert ctr["readinessProbe"]["httpGet"]["port"] == ctr["livenessProbe"]["httpGet"]["port"] == "http"
    health = re.search(r"^HEALTHCHECK .*'http://127\.0\.0\.1:%s(/\w+)'", dockerfile(), re.M | re.S)
    assert health and health[1] == "/healthz"
    for service in NODE_SERVICES:
        test = " ".join(compose()["services"][service]["healthcheck"]["test"])
        path = re.search(r"http://127\.0\.0\.1:\d+(/\w+)", test)
        assert path and path[1] in known


def test_shutdown_grace_covers_the_drain() -> None:
    """k8s grace > preStop sleep + drain timeout; compose stop_grace_period > drain timeout."""
    drain = float(k8s_env().get("HUB_DRAIN_TIMEOUT", Config.drain_timeout))
    spec = k8s()["Deployment"]["spec"]["template"]["spec"]
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] > float(command[1]) + drain
    for service in NODE_SERVICES:
        env_drain = float(compose_env(service).get("HUB_DRAIN_TIMEOUT", Config.drain_timeout))
        assert seconds(compose()["services"][service]["stop_grace_period"]) > env_drain


def test_selectors_match_the_pods() -> None:
    """The Service and the PodDisruptionBudget select exactly the Deployment's pods."""
    manifests = k8s()
    labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert manifests["Deployment"]["spec"]["selector"]["matchLabels"] == labels
    assert manifests["Service"]["spec"]["selector"] == labels
    assert manifests["Service"]["spec"].get("sessionAffinity", "None") == "None"
    assert manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    assert manifests["Deployment"]["spec"]["replicas"] > manifests["PodDisruptionBudget"]["spec"]["maxUnavailable"]


def test_compose_waits_for_health_and_redis_cannot_evict() -> None:
    """Nodes wait for a healthy Redis, nginx for healthy nodes; Redis runs noeviction without persistence."""
    services = compose()["services"]
    assert all("healthcheck" in s for s in services.values())
    for node in NODE_SERVICES:
        assert services[node]["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert services["nginx"]["depends_on"] == {n: {"condition": "service_healthy"} for n in NODE_SERVICES}
    command = services["redis"]["command"]
    def option(name: str) -> str:
        return str(command[command.index(name) + 1])

    assert (option("--maxmemory-policy"), option("--save"), option("--appendonly")) == ("noeviction", "", "no")
    assert compose_env("node1")["HUB_REDIS_URL"].startswith("redis://redis:")
    assert services["nginx"]["volumes"] == ["./nginx.conf:/etc/nginx/nginx.conf:ro"]


def test_dockerfile_runs_hubnode_as_non_root() -> None:
    """The image is slim, installs the speed extra, runs as a non-root user with `hubnode` as entrypoint."""
    text = dockerfile()
    assert all(re.fullmatch(r"python:3\.\d+-slim", base) for base in re.findall(r"^FROM (\S+)", text, re.M))
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert re.search(r'^ENTRYPOINT \["hubnode"\]$', text, re.M)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "hubnode" in scripts
    assert '"hubnode[server,speed]"' in text
    assert re.search(r'^HEALTHCHECK [^\n]*\\\n\s+CMD \["python", "-c"', text, re.M), "a python healthcheck (no curl)"


def test_nginx_passes_websockets_and_outlasts_the_ping_interval() -> None:
    """nginx.conf upgrades WebSockets and its proxy timeouts exceed the node's ping interval."""
    text = nginx_conf()
    for directive in ("proxy_http_version 1.1;", "proxy_set_header Upgrade $http_upgrade;",
                      "proxy_set_header Connection $connection_upgrade;", "map $http_upgrade $connection_upgrade"):
        assert directive in text
    ping = float(compose_env("node1").get("HUB_PING_INTERVAL", Config.ping_interval))
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        value = re.search(rf"^\s*{name} (\S+);", text, re.M)
        assert value and seconds(value[1]) > ping, name
    assert not re.search(r"^\s*(ip_hash|hash|sticky)\b", text, re.M)


def test_render_replaces_only_listen_and_servers() -> None:
    """The local cluster's copy of nginx.conf differs only in the listen line and the upstream servers."""
    text = nginx_conf()
    rendered = render_nginx_conf(text, "127.0.0.1:9999", ["127.0.0.1:1", "127.0.0.1:2"])
    changed = [line.strip() for line in rendered.splitlines() if line not in text.splitlines()]
    assert changed == ["server 127.0.0.1:1 max_fails=1 fail_timeout=5s;",
                       "server 127.0.0.1:2 max_fails=1 fail_timeout=5s;", "listen 127.0.0.1:9999;"]
    assert not re.search(r"server node\d", rendered)
    with pytest.raises(ValueError):
        render_nginx_conf(text.replace("# cluster.py: listen address", "# edited"), "127.0.0.1:1", ["a:1"])


def test_rendered_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    """`nginx -t` accepts the rendered local configuration, run as this user with a private prefix."""
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        missing("nginx is not installed (make sysdeps installs it)")
    exe = find_executable("nginx")
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_conf(nginx_conf(), f"127.0.0.1:{free_port()}", ["127.0.0.1:1", "127.0.0.1:2"]))
    cmd = nginx_command(exe, tmp_path, conf, tmp_path / "nginx.pid", nginx_version(exe), os.geteuid() == 0)
    result = subprocess.run([*cmd, "-t"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_docker_compose_config_accepts_the_file() -> None:
    """`docker compose config` validates compose.yaml, where a working Docker client with compose exists."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on this machine")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"`docker compose version` exits {probe.returncode}: "
                    f"{(probe.stderr or probe.stdout).strip().splitlines()[0]}")
    result = subprocess.run([docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_make_cluster_installs_only_what_it_runs() -> None:
    """`make cluster` (dry run): redis-server and nginx from apt, the node's extras; no Chromium, no dev tools."""
    shutil_make = shutil.which("make")
    assert shutil_make, "make is not installed"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # under make test
    dry = subprocess.run([shutil_make, "-n", "-B", "--no-print-directory", "cluster"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert "apt-get install -y -qq redis-server" in dry and "nginx-light" in dry
    assert "chromium" not in dry
    installs = re.findall(r"pip install[^\n]*", dry)
    assert any(".[server,speed]" in line for line in installs), installs
    assert not any("dev" in line or "bench" in line for line in installs), installs
    assert dry.rstrip().endswith("-m deploy.cluster")
