"""podtwin compose's generated project: the user's project, as ``docker compose config`` (v2.40)
prints it, with each x-podtwin service bridged to its target through a ``podtwin-S`` sidecar."""
from __future__ import annotations

import copy

import pytest
import yaml

from podtwin.runner.compose.generate import (Engaged, Sidecar, check_service, engaged_services, generate,
                                             local_names)
from podtwin.runner.sidecar import READY_FILE

SIDECAR = Sidecar(image="podtwin:test",
                  command=["python", "-m", "podtwin.runner.sidecar", "--session-dir", "/podtwin"],
                  container_name="podtwin-abcd-sidecar", labels={"podtwin.session": "abcd"},
                  cap_add=["NET_ADMIN"], devices=[], security_opt=[], binds=[("/state/abcd", "/podtwin", "")])

# `docker compose config` of a project whose api has no networks of its own.
PLAIN = """
name: ctest
services:
  api:
    command: [sh, -c, "echo hi"]
    depends_on:
      db:
        condition: service_started
        required: true
    environment:
      APP_MODE: local
    image: busybox
    networks:
      default: null
    x-podtwin:
      target: container/pt-target-m
  db:
    image: busybox
    networks:
      default: null
networks:
  default:
    name: ctest_default
"""


def model(text: str) -> dict:
    return yaml.safe_load(text)


def engaged(**kw) -> Engaged:
    return Engaged(SIDECAR, **kw)


def round_trips(out: dict) -> None:
    """What podtwin writes for compose reads back as the same project."""
    text = yaml.safe_dump(out, sort_keys=False, default_flow_style=False)
    assert yaml.safe_load(text) == out


def test_sidecar_takes_the_networks_with_the_service_name_first_among_the_aliases():
    """Other services still reach api by its name and its aliases, now on the sidecar; api joins it."""
    m = model("""
name: ctest
services:
  api:
    image: busybox
    networks:
      back:
        aliases: [api-internal]
      front: null
    x-podtwin: {target: deploy/api}
networks:
  back: {name: ctest_back}
  front: {name: ctest_front}
""")
    out = generate(m, {"api": engaged()})
    assert out["services"]["podtwin-api"]["networks"] == {"back": {"aliases": ["api", "api-internal"]},
                                                         "front": {"aliases": ["api"]}}
    assert out["services"]["api"]["network_mode"] == "service:podtwin-api"
    assert "networks" not in out["services"]["api"]
    assert out["networks"] == m["networks"]
    round_trips(out)


def test_default_network_is_named_for_the_sidecar():
    """A service on compose's default network only: the sidecar is on it as `api`."""
    out = generate(model(PLAIN), {"api": engaged()})
    assert out["services"]["podtwin-api"]["networks"] == {"default": {"aliases": ["api"]}}
    round_trips(out)


def test_other_services_still_reach_the_service_by_its_container_name():
    """A service others call by its container_name is still reachable by it."""
    m = model("""
name: ctest
services:
  api:
    container_name: my-api
    image: busybox
    networks:
      default: null
    x-podtwin: {target: deploy/api}
""")
    out = generate(m, {"api": engaged()})
    assert "my-api" in out["services"]["podtwin-api"]["networks"]["default"]["aliases"]


def test_ports_and_name_settings_move_to_the_sidecar():
    """What Docker refuses on a joined container is on the sidecar, not on api."""
    m = model("""
name: ctest
services:
  api:
    image: busybox
    ports:
      - {mode: ingress, target: 8080, published: "18080", protocol: tcp, host_ip: 127.0.0.1}
    expose: ["9090"]
    hostname: api-host
    domainname: example.test
    dns: [10.0.0.53]
    dns_search: [corp.test]
    dns_opt: [ndots:1]
    extra_hosts: ["registry=10.0.0.9"]
    mac_address: 02:42:ac:11:00:02
    networks:
      default: null
    x-podtwin: {target: deploy/api}
""")
    out = generate(m, {"api": engaged(hostname="api-7d9f-xyz")})
    api, sidecar = out["services"]["api"], out["services"]["podtwin-api"]
    moved = ("ports", "expose", "hostname", "domainname", "dns", "dns_search", "dns_opt", "extra_hosts",
             "mac_address")
    for key in moved:
        assert sidecar[key] == m["services"]["api"][key], key
        assert key not in api, key
    assert sidecar["hostname"] == "api-host"   # the compose file's hostname wins over the target's
    round_trips(out)


def test_target_hostname_when_the_service_sets_none():
    """Without a hostname of its own, api answers to the target's."""
    out = generate(model(PLAIN), {"api": engaged(hostname="api-7d9f-xyz")})
    assert out["services"]["podtwin-api"]["hostname"] == "api-7d9f-xyz"
    assert "hostname" not in out["services"]["api"]


def test_target_env_fills_only_what_the_compose_file_leaves_unset_and_is_escaped():
    """The compose file's values win; the target's `$` reaches the app literally."""
    # env_file entries are already folded into `environment` by compose's config.
    m = model("""
name: ctest
services:
  api:
    environment:
      APP_MODE: local
      FROM_ENV_FILE: file-value
    image: busybox
    networks:
      default: null
    x-podtwin: {target: deploy/api}
""")
    out = generate(m, {"api": engaged(env={"APP_MODE": "prod", "FROM_ENV_FILE": "target",
                                          "DB_URL": "postgres://db:5432", "PASSWORD": "pa$word$$x"})})
    assert out["services"]["api"]["environment"] == {"APP_MODE": "local", "FROM_ENV_FILE": "file-value",
                                                     "DB_URL": "postgres://db:5432",
                                                     "PASSWORD": "pa$$word$$$$x"}
    round_trips(out)


def test_no_environment_key_when_there_is_none():
    """No environment from either side: no empty key."""
    m = model(PLAIN)
    del m["services"]["api"]["environment"]
    assert "environment" not in generate(m, {"api": engaged()})["services"]["api"]


def test_depends_on_keeps_the_services_own_and_waits_for_a_healthy_sidecar():
    """api still waits for db, and for its sidecar to be healthy."""
    out = generate(model(PLAIN), {"api": engaged()})
    assert out["services"]["api"]["depends_on"] == {
        "db": {"condition": "service_started", "required": True},
        "podtwin-api": {"condition": "service_healthy"}}
    round_trips(out)


def test_depends_on_list_form():
    """A list of dependencies becomes the mapping form, started condition."""
    m = model(PLAIN)
    m["services"]["api"]["depends_on"] = ["db"]
    out = generate(m, {"api": engaged()})
    assert out["services"]["api"]["depends_on"] == {"db": {"condition": "service_started"},
                                                    "podtwin-api": {"condition": "service_healthy"}}


def test_profiles_and_the_extension_are_gone():
    """compose is not asked to understand x-podtwin or re-filter profiles."""
    m = model("""
name: ctest
services:
  api:
    image: busybox
    networks:
      default: null
    profiles: [dev]
    x-podtwin: {target: deploy/api}
  db:
    image: busybox
    networks:
      default: null
    profiles: [dev, test]
  worker:
    image: busybox
    networks:
      default: null
    x-podtwin: {target: deploy/worker}
x-podtwin:
  namespace: staging
x-other:
  kept: true
""")
    out = generate(m, {"api": engaged()})   # worker carries x-podtwin but is not engaged
    for name, service in out["services"].items():
        assert "profiles" not in service, name
        assert "x-podtwin" not in service, name
    assert "x-podtwin" not in out
    assert out["x-other"] == {"kept": True}
    assert out["services"]["worker"] == {"image": "busybox", "networks": {"default": None}}
    round_trips(out)


def test_target_files_are_bound_on_the_service_except_where_it_declares_a_volume():
    """The target's files appear at their paths, except where the user mounts something."""
    m = model("""
name: ctest
services:
  api:
    image: busybox
    networks:
      default: null
    volumes:
      - {type: volume, source: data, target: /data, volume: {}}
      - {type: bind, source: /abs/path, target: /etc/app, bind: {create_host_path: true}}
    x-podtwin: {target: deploy/api}
volumes:
  data:
    name: ctest_data
""")
    files = [("/fs/abcd/etc/app", "/etc/app", False), ("/fs/abcd/etc/secrets", "/etc/secrets", False),
             ("/fs/abcd/var/cache", "/var/cache", True)]
    out = generate(m, {"api": engaged(files=files)})
    volumes = out["services"]["api"]["volumes"]
    assert volumes[:2] == m["services"]["api"]["volumes"]   # the user's win, untouched
    assert volumes[2:] == [
        {"type": "bind", "source": "/fs/abcd/etc/secrets", "target": "/etc/secrets",
         "bind": {"propagation": "rslave"}, "read_only": True},
        {"type": "bind", "source": "/fs/abcd/var/cache", "target": "/var/cache",
         "bind": {"propagation": "rslave"}, "read_only": False}]
    targets = [v["target"] for v in volumes]
    assert len(targets) == len(set(targets))
    round_trips(out)


def test_short_form_volume_wins_over_a_target_file():
    """A short-form volume on the same path (trailing slashes aside) wins too."""
    m = model(PLAIN)
    m["services"]["api"]["volumes"] = ["./conf:/etc/app:ro", "/etc/other/"]
    out = generate(m, {"api": engaged(files=[("/fs/abcd/etc/app", "/etc/app/", False),
                                             ("/fs/abcd/etc/other", "/etc/other", False)])})
    assert out["services"]["api"]["volumes"] == ["./conf:/etc/app:ro", "/etc/other/"]


def test_services_without_the_extension_are_unchanged():
    """db runs exactly as the user wrote it."""
    m = model("""
name: ctest
services:
  api:
    image: busybox
    networks:
      default: null
    x-podtwin: {target: deploy/api}
  db:
    image: postgres:16
    environment:
      POSTGRES_PASSWORD: pa$$word
    healthcheck:
      test: [CMD, pg_isready]
      interval: 1s
    hostname: db-host
    networks:
      default:
        aliases: [database]
    ports:
      - {mode: ingress, target: 5432, published: "15432", protocol: tcp}
    profiles: [dev]
    volumes:
      - {type: volume, source: pg, target: /var/lib/postgresql/data, volume: {}}
""")
    expected = copy.deepcopy(m["services"]["db"])
    del expected["profiles"]
    out = generate(m, {"api": engaged(env={"X": "y"}, labels={"podtwin.session": "abcd"})})
    assert out["services"]["db"] == expected


def test_sidecar_service():
    """The sidecar: the session's image and mounts, health gated on its ready file, labelled."""
    m = model(PLAIN)
    m["services"]["api"]["labels"] = {"team": "payments", "podtwin.session": "stale"}
    out = generate(m, {"api": engaged(labels={"podtwin.session": "abcd", "podtwin.role": "app"},
                                      startup_timeout=45.0)})
    sidecar = out["services"]["podtwin-api"]
    assert sidecar["image"] == "podtwin:test"
    assert sidecar["command"] == ["python", "-m", "podtwin.runner.sidecar", "--session-dir", "/podtwin"]
    assert sidecar["container_name"] == "podtwin-abcd-sidecar"
    assert READY_FILE in sidecar["healthcheck"]["test"]
    assert sidecar["healthcheck"]["test"][0] == "CMD"
    assert sidecar["healthcheck"]["start_period"] == "45s"
    assert sidecar["cap_drop"] == ["ALL"]
    assert sidecar["cap_add"] == ["NET_ADMIN"]
    assert sidecar["volumes"] == [{"type": "bind", "source": "/state/abcd", "target": "/podtwin"}]
    assert sidecar["attach"] is False
    assert sidecar["labels"] == {"podtwin.session": "abcd"}
    assert "devices" not in sidecar and "security_opt" not in sidecar
    assert out["services"]["api"]["labels"] == {"team": "payments", "podtwin.session": "abcd",
                                                "podtwin.role": "app"}
    round_trips(out)


def test_sidecar_devices_security_options_and_propagated_binds():
    """Devices, security options and bind propagation the engine asks for reach the sidecar."""
    sidecar = Sidecar("podtwin:test", ["python"], "podtwin-abcd-sidecar", {}, ["NET_ADMIN", "SYS_ADMIN"],
                      ["/dev/fuse"], ["apparmor:unconfined"],
                      [("/state/abcd", "/podtwin", ""), ("/var/lib/docker/volumes/fs/_data", "/fs", "rshared")])
    out = generate(model(PLAIN), {"api": Engaged(sidecar)})
    service = out["services"]["podtwin-api"]
    assert service["devices"] == ["/dev/fuse"]
    assert service["security_opt"] == ["apparmor:unconfined"]
    assert service["volumes"][1] == {"type": "bind", "source": "/var/lib/docker/volumes/fs/_data",
                                     "target": "/fs", "bind": {"propagation": "rshared"}}
    assert "labels" not in out["services"]["api"]   # the session names no labels, the service has none


def test_input_model_is_not_changed():
    """generate leaves compose's model as it was."""
    m = model(PLAIN)
    before = copy.deepcopy(m)
    generate(m, {"api": engaged(env={"A": "1"}, files=[("/s", "/etc/app", False)], labels={"l": "v"})})
    assert m == before


def test_engaged_services_merge_the_project_defaults():
    """A service's own x-podtwin keys beat the project's; a bare string is its target."""
    m = model("""
name: ctest
services:
  api:
    image: busybox
    x-podtwin:
      target: deploy/api
      namespace: dev
  worker:
    image: busybox
    x-podtwin: deploy/worker
  db:
    image: busybox
x-podtwin:
  namespace: staging
  context: kind-kind
""")
    assert engaged_services(m) == {
        "api": {"namespace": "dev", "context": "kind-kind", "target": "deploy/api"},
        "worker": {"namespace": "staging", "context": "kind-kind", "target": "deploy/worker"}}


@pytest.mark.parametrize("extension", [" {}", ""], ids=["empty", "null"])
def test_engaged_service_with_an_empty_or_null_extension_takes_the_defaults(extension):
    """`x-podtwin: {}`, or `x-podtwin:` with no value, engages the service with the project's defaults."""
    m = model(f"""
name: ctest
services:
  api:
    image: busybox
    x-podtwin:{extension}
x-podtwin:
  target: deploy/api
""")
    assert engaged_services(m) == {"api": {"target": "deploy/api"}}


def test_local_names():
    """Every name the project's services go by, lowercased, stays local."""
    m = model("""
name: ctest
services:
  API:
    container_name: Api-Container
    hostname: Api-Host
    image: busybox
    networks:
      back:
        aliases: [API-Internal, api.internal]
      front: null
    extra_hosts: ["Registry=10.0.0.9", "mirror:10.0.0.10", "v6host=::1"]
  db:
    image: busybox
    networks:
      default: null
    extra_hosts:
      Gateway.Local: 10.0.0.1
      other: [10.0.0.2, 10.0.0.3]
""")
    assert local_names(m) == sorted(["api", "api-container", "api-host", "api-internal", "api.internal",
                                     "registry", "mirror", "v6host", "db", "gateway.local", "other"])


def test_check_service_refusals():
    """What cannot be bridged is refused with the service named; a plain service passes."""
    m = model(PLAIN)
    assert check_service("api", m["services"]["api"], m) is None

    host = model(PLAIN)
    host["services"]["api"]["network_mode"] = "host"
    why = check_service("api", host["services"]["api"], host)
    assert why and "'api'" in why and "network_mode" in why

    taken = model(PLAIN)
    taken["services"]["podtwin-api"] = {"image": "busybox"}
    why = check_service("api", taken["services"]["api"], taken)
    assert why and "'podtwin-api'" in why

    shared = model(PLAIN)
    shared["services"]["debug"] = {"image": "busybox", "network_mode": "service:api"}
    why = check_service("api", shared["services"]["api"], shared)
    assert why and "'debug'" in why and "'api'" in why


def test_check_service_refuses_a_container_sharing_by_container_name():
    """Sharing api's network by its container name is refused too."""
    m = model(PLAIN)
    m["services"]["api"]["container_name"] = "my-api"
    m["services"]["debug"] = {"image": "busybox", "network_mode": "container:my-api"}
    why = check_service("api", m["services"]["api"], m)
    assert why and "'debug'" in why
