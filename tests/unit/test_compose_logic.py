"""podtwin compose's pure logic around the generator: which services `up ARGS` starts, how a
service's x-podtwin becomes its config, where the project directory is, and how the sidecar's
resolver keeps the project's names local."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from podtwin.runner.compose.project import _started_services, service_config
from podtwin.runner.compose.tool import ProjectArgs
from podtwin.runner.errors import ConfigError
from podtwin.runner.progress import Progress
from podtwin.runner.sidecar.__main__ import Decider
from podtwin.runner.sidecar.dns.names import NameCache
from podtwin.runner.sidecar.dns.resolver import nxdomain
from podtwin.runner.sidecar.outgoing.policy import DnsFilter, OutgoingFilter
from podtwin.runner.config.models import DnsConfig, OutgoingConfig

MODEL = {"services": {"api": {"depends_on": {"db": {"condition": "service_started"}}},
                      "db": {"depends_on": {"cache": {}}}, "cache": {}, "web": {}}}


def test_up_with_service_names_starts_them_and_what_they_depend_on():
    assert _started_services(MODEL, ()) is None                       # no names: every service
    assert _started_services(MODEL, ("api",)) == {"api", "db", "cache"}
    # a flag's value is not a service name
    assert _started_services(MODEL, ("--exit-code-from", "web", "--build", "web")) == {"web"}


def test_x_podtwin_keys_become_the_services_config(tmp_path: Path):
    (tmp_path / "api.json").write_text('{"feature": {"network": {"incoming": "steal"}}}')
    cfg = service_config("api", {"target": "deploy/api", "namespace": "shop", "context": "kind-x",
                                 "config": "api.json", "agent": {"ttl": 30}}, tmp_path, Progress(True))
    assert cfg.target.path == "deployment/api" and cfg.target.namespace == "shop"
    assert cfg.kube_context == "kind-x" and cfg.agent.ttl == 30
    assert cfg.feature.network.incoming.mode == "steal"   # from the file it names, relative to the project


def test_no_config_file_is_picked_up_from_the_project_directory(tmp_path: Path):
    """A compose file named podtwin.yaml (or another service's config) in the project's directory
    is not taken for this service's config: only the file x-podtwin names is read."""
    (tmp_path / "podtwin.yaml").write_text("services: {api: {image: x}}\n")
    cfg = service_config("api", {"target": "container/t"}, tmp_path, Progress(True))
    assert cfg.target.path == "container/t"


def test_a_bad_x_podtwin_names_the_service(tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        service_config("worker", {"target": "deploy/w", "feature": {"nope": 1}}, tmp_path, Progress(True))
    assert err.value.message.startswith("service 'worker': ")


def test_project_directory_as_compose_picks_it(tmp_path: Path):
    assert ProjectArgs(cwd=tmp_path).directory() == tmp_path.resolve()
    assert ProjectArgs(files=("sub/compose.yaml",), cwd=tmp_path).directory() == (tmp_path / "sub").resolve()
    assert ProjectArgs(files=("a.yaml",), project_directory="proj", cwd=tmp_path).directory() == (tmp_path / "proj").resolve()
    assert ProjectArgs(files=("a.yaml", "b.yaml"), project_name="p", profiles=("dev",)).argv() == [
        "-f", "a.yaml", "-f", "b.yaml", "-p", "p", "--profile", "dev"]


def decider(**kw) -> Decider:
    return Decider(OutgoingFilter.from_config(OutgoingConfig()), DnsFilter.from_config(DnsConfig()), NameCache(), **kw)


def test_the_projects_names_resolve_locally_even_where_the_cluster_has_a_namesake():
    d = decider(local_names=("db", "api"), search=("shop.svc.cluster.local", "svc.cluster.local"))
    assert d.query("db") == "local" and d.query("DB.") == "local"
    # the app's resolver tries the search domains first: a cluster Service `db` must not win
    assert d.query("db.shop.svc.cluster.local") == "nxdomain"
    assert d.query("db.svc.cluster.local.") == "nxdomain"
    assert d.query("db.other.svc.cluster.local") == "remote"   # another namespace's is asked for by name
    assert d.query("backend") == "remote"
    assert decider().query("db") == "remote"                     # no project: the filter alone decides


def test_nxdomain_answers_the_query_with_rcode_3():
    query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x02db\x00" + struct.pack("!HH", 1, 1)
    answer = nxdomain(query)
    ident, flags, qd, an = struct.unpack_from("!HHHH", answer)
    assert ident == 0x1234 and flags & 0x8000 and flags & 0x000F == 3 and qd == 1 and an == 0
    assert answer.endswith(b"\x02db\x00" + struct.pack("!HH", 1, 1))
