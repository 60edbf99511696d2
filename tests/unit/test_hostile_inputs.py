"""Hostile input, table-driven (issue #13): every bad config file, key, value, target string,
image name, flag, environment value or environment setting gets exactly one line on stderr
(`podtwin: <problem> — <fix>`), docker run's exit code 125, no traceback, and nothing left in
the state directory.

The CLI runs in-process, exactly as the console script does (``cli.run``), with Docker and the
cluster pointed at nothing: every case here must be refused from the input alone, before anything
is asked of an engine. Faults at run time (a target that stops, pauses or vanishes, an agent
killed mid-session) are in the integration suites, against real Docker and a real cluster.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import pytest

from podtwin.runner import cli

NUL_SOCKET = "unix:///nonexistent/podtwin-test-docker.sock"


@dataclass
class Case:
    id: str
    args: list[str]
    expect: str                                     # a substring of the one error line
    files: dict[str, str | bytes] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    code: int = 125


def config(id: str, data, expect: str, name: str = "c.json") -> Case:
    """A `config check -f` case; ``data`` is written as JSON unless it is already text or bytes."""
    body = data if isinstance(data, (str, bytes)) else json.dumps(data)
    return Case(id, ["config", "check", "-f", "{tmp}/" + name], expect, files={name: body})


def run(id: str, args: list[str], expect: str, **kw) -> Case:
    return Case(id, ["container", "run", *args], expect, **kw)


def nested(path: str, value):
    """{"a": {"b": value}} from "a.b"."""
    out = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return out


# -- config files: syntax, encodings, shapes ------------------------------------------------------
SYNTAX = [
    config("json-syntax", '{"target": "deploy/api",}', "invalid JSON"),
    config("json-unclosed", '{"target": ', "invalid JSON"),
    config("json-top-list", "[1, 2]", "the top level must be a mapping"),
    config("json-top-string", '"deploy/api"', "the top level must be a mapping"),
    config("json-top-number", "42", "the top level must be a mapping"),
    config("json-utf16", '{"target": "deploy/api"}'.encode("utf-16"), "is not UTF-8 text"),
    config("json-latin1", '{"target": "d\xe9ploy/api"}'.encode("latin-1"), "is not UTF-8 text"),
    config("json-binary", bytes(range(256)), "is not UTF-8 text"),
    config("json-deep", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    config("json-nan-timeout", '{"agent": {"startup_timeout": NaN}}', "agent.startup_timeout"),
    config("json-huge-timeout", '{"agent": {"startup_timeout": 1e30}}', "agent.startup_timeout"),
    config("yaml-syntax", "target: [unclosed\n", "invalid YAML", "c.yaml"),
    config("yaml-tab", "feature:\n\tfs: read\n", "invalid YAML", "c.yaml"),
    config("yaml-top-list", "- a\n- b\n", "the top level must be a mapping", "c.yaml"),
    config("yaml-deep", "a: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply", "c.yaml"),
    config("yaml-utf16", "target: deploy/api\n".encode("utf-16"), "is not UTF-8 text", "c.yaml"),
    config("yaml-alias-bomb", "\n".join(
        ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
        + [f"a{i}: &a{i} [{', '.join([f'*a{i-1}'] * 10)}]" for i in range(1, 9)]) + "\n",
        "aliases expand to more than", "c.yaml"),
    config("yaml-python-tag", "target: !!python/object/apply:os.system ['true']\n", "invalid YAML", "c.yaml"),
    config("toml-syntax", "target = \n", "invalid TOML", "c.toml"),
    config("toml-utf16", 'target = "deploy/api"\n'.encode("utf-16"), "is not UTF-8 text", "c.toml"),
    config("unknown-extension", '{"target": "deploy/api"}', "unknown config format", "c.ini"),
    config("template-missing-env", '{"target": "{{ get_env(name=\'PT_HOSTILE_UNSET\') }}"}',
           "PT_HOSTILE_UNSET is not set and has no default"),
    config("template-other", '{"target": "{% if x %}deploy/api{% endif %}"}', "template syntax other than"),
    Case("config-missing", ["config", "check", "-f", "{tmp}/nope.json"], "not found"),
    Case("config-dir", ["config", "check", "-f", "{tmp}"], "is a directory"),
    Case("config-dev-null", ["config", "check", "-f", "/dev/null"], "not a regular file"),
    Case("config-fifo", ["config", "check", "-f", "{tmp}/fifo.json"], "not a regular file", files={"fifo.json": None}),
    Case("config-unreadable", ["config", "check", "-f", "{tmp}/locked.json"], "cannot read config file",
         files={"locked.json": b"{}"}),
]

# -- keys: unknown, wrong types, out of bounds, bad regexes and addresses ---------------------------
BAD_VALUES: list[tuple[str, object, str]] = [
    ("bogus_key", 1, "unknown key"),
    ("feature.bogus", 1, "unknown key"),
    ("feature.network.bogus", 1, "unknown key"),
    ("feature.network.incoming.bogus", 1, "unknown key"),
    ("feature.env.bogus", 1, "unknown key"),
    ("feature.fs.bogus", 1, "unknown key"),
    ("agent.bogus", 1, "unknown key"),
    ("container.bogus", 1, "unknown key"),
    ("target", 5, "target"),
    ("target", ["deploy/api"], "target"),
    ("target", "banana/x", "unknown kind"),
    ("target", "deployment/", "target"),
    ("target", "pod/a/b", "target"),
    ("target", "rollout/x", "Argo Rollouts are not supported yet"),
    ("target", "targetless/x", "target"),
    ("target", {"deployment": 5}, "target"),
    ("target", {"deployment": "a", "pod": "b"}, "exactly one kind"),
    ("target", {"path": "deploy/api", "namespace": 5}, "target.namespace"),
    ("target", {"path": "deploy/api", "bogus": 1}, "target"),
    ("target", "container/", "target"),
    ("target", "container/bad name", "target"),
    ("kube_context", 5, "kube_context"),
    ("kubeconfig", 5, "kubeconfig"),
    ("description", ["x"], "description"),
    ("feature", "all", "feature"),
    ("feature.env", "yes", "feature.env"),
    ("feature.env.enabled", "true", "feature.env.enabled"),
    ("feature.env.enabled", 1, "feature.env.enabled"),
    ("feature.env.include", 5, "feature.env.include"),
    ("feature.env", {"include": "A", "exclude": "B"}, "mutually exclusive"),
    ("feature.env.override", {"": "x"}, "override names"),
    ("feature.env.override", {"A=B": "x"}, "override names"),
    ("feature.env.override", {"BIG": "x" * (1 << 20)}, "environment variable BIG"),
    ("feature.env.override", ["A=1"], "feature.env.override"),
    ("feature.env.unset", 5, "feature.env.unset"),
    ("feature.env.env_file", "/nonexistent/podtwin.env", "podtwin.env"),
    ("feature.env.env_file", 5, "feature.env.env_file"),
    ("feature.network", "yes", "feature.network"),
    ("feature.network.incoming", "sideways", "feature.network.incoming"),
    ("feature.network.incoming", 5, "feature.network.incoming"),
    ("feature.network.incoming.mode", "bogus", "feature.network.incoming.mode"),
    ("feature.network.incoming.mode", True, "feature.network.incoming.mode"),
    ("feature.network.incoming.ports", [-1], "feature.network.incoming.ports"),
    ("feature.network.incoming.ports", [70000], "feature.network.incoming.ports"),
    ("feature.network.incoming.ports", ["http"], "feature.network.incoming.ports"),
    ("feature.network.incoming.ports", [True], "feature.network.incoming.ports"),
    ("feature.network.incoming.ports", 80, "feature.network.incoming.ports"),
    ("feature.network.incoming.ignore_ports", [0], "feature.network.incoming.ignore_ports"),
    ("feature.network.incoming.port_mapping", [[1]], "feature.network.incoming.port_mapping"),
    ("feature.network.incoming.port_mapping", [[1, 2, 3]], "feature.network.incoming.port_mapping"),
    ("feature.network.incoming.port_mapping", [[0, 80]], "feature.network.incoming.port_mapping"),
    ("feature.network.incoming.port_mapping", [[8080, 80], [8080, 81]], "maps local port 8080 to several"),
    ("feature.network.incoming.port_mapping", "8080:80", "feature.network.incoming.port_mapping"),
    ("feature.network.incoming", {"mode": "mirror", "http_filter": {"header_filter": "x"}}, "mode steal only"),
    ("feature.network.incoming", {"mode": "steal", "http_filter": {"header_filter": "("}}, "not a valid regex"),
    ("feature.network.incoming", {"mode": "steal", "http_filter": {"path_filter": "[z-a]"}}, "not a valid regex"),
    ("feature.network.incoming", {"mode": "steal", "http_filter": {"method_filter": ""}}, "HTTP method"),
    ("feature.network.incoming", {"mode": "steal", "http_filter": {"method_filter": "G ET"}}, "HTTP method"),
    ("feature.network.incoming", {"mode": "steal", "http_filter": {"body_filter": "x"}}, "body filters"),
    ("feature.network.incoming", {"mode": "steal", "http_filter": {"header_filter_jq": "."}}, "jq header filters"),
    ("feature.network.incoming", {"mode": "steal", "http_filter": {}}, "http_filter"),
    ("feature.network.incoming", {"mode": "steal", "http_filter": {"ports": [70000], "header_filter": "x"}},
     "http_filter.ports"),
    ("feature.network.incoming", {"mode": "steal", "http_filter": {"any_of": [{"header": "("}]}}, "not a valid regex"),
    ("feature.network.incoming", {"mode": "steal", "http_filter": {"all_of": "x"}}, "all_of"),
    ("feature.network.incoming.http_header_filter", {"filter": "x"}, "http_filter.header_filter"),
    ("feature.network.outgoing", "sometimes", "feature.network.outgoing"),
    ("feature.network.outgoing.tcp", "yes", "feature.network.outgoing.tcp"),
    ("feature.network.outgoing.udp", 0, "feature.network.outgoing.udp"),
    ("feature.network.outgoing.filter", {"remote": ["300.1.1.1"]}, "300.1.1.1"),
    ("feature.network.outgoing.filter", {"remote": ["10.0.0.1/33"]}, "10.0.0.1/33"),
    ("feature.network.outgoing.filter", {"local": ["ftp://x"]}, "protocol must be tcp:// or udp://"),
    ("feature.network.outgoing.filter", {"local": [""]}, "empty filter entry"),
    ("feature.network.outgoing.filter", {"local": ["db:99999"]}, "db:99999"),
    ("feature.network.outgoing.filter", {"local": ["db:http"]}, "db:http"),
    ("feature.network.outgoing.filter", {"local": ["bad_host!"]}, "bad_host!"),
    ("feature.network.outgoing.filter", {"local": ["a"], "remote": ["b"]}, "feature.network.outgoing.filter"),
    ("feature.network.outgoing.filter", {"local": 5}, "feature.network.outgoing.filter"),
    ("feature.network.dns", "maybe", "feature.network.dns"),
    ("feature.network.dns.enabled", 1, "feature.network.dns.enabled"),
    ("feature.network.dns.filter", {"local": ["tcp://db"]}, "DNS filter entries take no protocol"),
    ("feature.network.dns.filter", {"remote": ["1.2.3"]}, "1.2.3"),
    ("feature.fs", 5, "feature.fs"),
    ("feature.fs", "bogus", "feature.fs"),
    ("feature.fs.mode", "readonly", "feature.fs.mode"),
    ("feature.fs.read_only", ["("], "not a valid regex"),
    ("feature.fs.read_write", ["[z-a]"], "not a valid regex"),
    ("feature.fs.local", ["*.py"], "not a valid regex"),
    ("feature.fs.not_found", 5, "feature.fs.not_found"),
    ("feature.fs.mapping", {"(": "/x"}, "not a valid regex"),
    ("feature.fs.mapping", ["/a", "/b"], "feature.fs.mapping"),
    ("agent", "yes", "agent"),
    ("agent.startup_timeout", True, "agent.startup_timeout"),
    ("agent.startup_timeout", -1, "agent.startup_timeout"),
    ("agent.startup_timeout", 0, "agent.startup_timeout"),
    ("agent.startup_timeout", "10", "agent.startup_timeout"),
    ("agent.communication_timeout", 0, "agent.communication_timeout"),
    ("agent.communication_timeout", 10 ** 9, "agent.communication_timeout"),
    ("agent.ttl", -5, "agent.ttl"),
    ("agent.ttl", 1.5, "agent.ttl"),
    ("agent.image", 5, "agent.image"),
    ("agent.image_pull_policy", "Sometimes", "agent.image_pull_policy"),
    ("agent.namespace", 5, "agent.namespace"),
    ("agent.ephemeral", "no", "agent.ephemeral"),
    ("agent.privileged", 1, "agent.privileged"),
    ("agent.labels", ["a"], "agent.labels"),
    ("agent.annotations", "a=b", "agent.annotations"),
    ("agent.tolerations", "x", "agent.tolerations"),
    ("agent.node_selector", ["x"], "agent.node_selector"),
    ("agent.resources", {"requests": 5}, "agent.resources"),
    ("agent.resources", {"bogus": {}}, "agent.resources"),
    ("agent.image_pull_secrets", "x", "agent.image_pull_secrets"),
    ("agent.image_pull_secrets", [{"nom": "x"}], "agent.image_pull_secrets"),
    ("agent.transport", "pigeon", "agent.transport"),
    ("container", "yes", "container"),
    ("container.cli_extra_args", ["--network", "host"], "--network is not allowed"),
    ("container.cli_extra_args", ["--privileged"], "--privileged"),
    ("container.cli_extra_args", ["--pid", "host"], "--pid"),
    ("container.cli_extra_args", ["-p"], "-p"),
    ("container.cli_extra_args", ["-p", "notaport"], "notaport"),
    ("container.cli_extra_args", ["--dns", "8.8.8.8"], "--dns"),
    ("container.cli_extra_args", 5, "container.cli_extra_args"),
]
KEYS = [config(f"key-{i:03d}-{path}", nested(path, value), expect)
        for i, (path, value, expect) in enumerate(BAD_VALUES)]

# -- targets on the command line, profiles ------------------------------------------------------------
TARGETS = [Case(f"target-flag-{i}", ["config", "check", "--target", text], expect) for i, (text, expect) in enumerate([
    ("banana/x", "unknown kind"), ("deploy/", "target"), ("x", "no kind given"), ("container/", "target"),
    ("pod//x", "target"), ("deploy/a/container/", "target"), ("deploy/a/b/c/d", "target"),
    ("labels/app=x", "label selectors are not supported yet"), ("/", "target"), ("container/-x", "target"),
])] + [
    Case("profile-unknown", ["config", "check", "--profile", "nope"], "unknown profile 'nope'"),
    Case("profile-empty", ["config", "check", "--profile", ""], "unknown profile ''"),
]

# -- container run: flags, images, env values, the environment -------------------------------------
RUNS = [
    run("no-target", ["app:dev"], "no target given"),
    run("image-empty", ["--target", "container/t", ""], "no image given"),
    run("image-blank", ["--target", "container/t", "   "], "no image given"),
    run("no-image", ["--target", "container/t"], "Missing argument 'IMAGE'"),
    run("network-host", ["--target", "container/t", "--network", "host", "app"], "--network host cannot be used"),
    run("network-none", ["--target", "container/t", "--network", "none", "app"], "--network none cannot be used"),
    run("network-container", ["--target", "container/t", "--network", "container:db", "app"],
        "--network container:db cannot be used"),
    run("user-and-target-user", ["--target", "container/t", "-u", "1", "--as-target-user", "app"],
        "--user and --as-target-user"),
    run("env-empty-name", ["--target", "container/t", "-e", "=x", "app"], "=x"),
    run("env-huge", ["--target", "container/t", "-e", "BIG=" + "x" * 200_000, "app"], "environment variable BIG"),
    run("fs-bogus", ["--target", "container/t", "--fs", "bogus", "app"], "Invalid value for '--fs'"),
    run("unknown-flag", ["--bogus", "app"], "No such option '--bogus'"),
    run("target-bad", ["--target", "banana/x", "app"], "unknown kind"),
    run("target-rollout", ["--target", "rollout/x", "app"], "Argo Rollouts are not supported yet"),
    run("run-config-missing", ["-f", "{tmp}/nope.json", "--target", "container/t", "app"], "not found"),
    run("config-bad", ["-f", "{tmp}/c.json", "app"], "invalid JSON", files={"c.json": "{"}),
    run("run-profile-unknown", ["--profile", "nope", "--target", "container/t", "app"], "unknown profile"),
    run("env-file-missing", ["-f", "{tmp}/c.json", "--target", "container/t", "app"], "missing.env",
        files={"c.json": json.dumps({"feature": {"env": {"env_file": "{tmp}/missing.env"}}})}),
    run("env-file-binary", ["-f", "{tmp}/c.json", "--target", "container/t", "app"], "bin.env",
        files={"c.json": json.dumps({"feature": {"env": {"env_file": "{tmp}/bin.env"}}}),
               "bin.env": b"A=\xff\xfe\n"}),
    run("state-dir-is-a-file", ["--target", "container/t", "app"], "not a directory",
        files={"state": "a file"}, env={"PODTWIN_STATE_DIR": "{tmp}/state"}),
    run("state-dir-too-long", ["--target", "container/t", "app"], "too long a path",
        env={"PODTWIN_STATE_DIR": "/tmp/" + "d" * 120}),
    run("state-dir-unwritable", ["--target", "container/t", "app"], "not writable",
        files={"ro/": None}, env={"PODTWIN_STATE_DIR": "{tmp}/ro/state"}),
    run("detach-interactive", ["--target", "container/t", "-d", "-i", "app"], "-d and -i cannot go together"),
    run("docker-arg-network", ["--target", "container/t", "--docker-arg=--add-host", "--docker-arg=a:1.2.3.4", "app"],
        "--add-host is not allowed"),
    Case("container-form-not-run", ["container", "--target", "container/t", "--", "docker", "build", "."],
         "after --, give the `docker run` command"),
    Case("container-form-detach", ["container", "--target", "container/t", "--", "docker", "run", "-dit", "app"],
         "-d and -i cannot go together"),
    Case("stop-blank", ["stop", " "], "no session named"),
    Case("stop-nothing", ["stop"], "Missing argument 'SESSION...'"),
    Case("unknown-command", ["bogus"], "No such command 'bogus'"),
    Case("clean-bad-target", ["clean", "--target", "deploy/x"], "container/NAME"),
]

CASES = SYNTAX + KEYS + TARGETS + RUNS


def test_the_suite_is_large_enough():
    assert len(CASES) >= 150, len(CASES)
    assert len({c.id for c in CASES}) == len(CASES)


def _materialise(case: Case, tmp) -> tuple[list[str], dict[str, str]]:
    for name, body in case.files.items():
        path = tmp / name
        if name.endswith("/"):
            path.mkdir()
            path.chmod(0o500)
        elif body is None:
            os.mkfifo(path)
        elif isinstance(body, bytes):
            path.write_bytes(body)
        else:
            path.write_text(body.replace("{tmp}", str(tmp)))
    if "locked.json" in case.files:
        (tmp / "locked.json").chmod(0)
    return ([a.replace("{tmp}", str(tmp)) for a in case.args],
            {k: v.replace("{tmp}", str(tmp)) for k, v in case.env.items()})


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_input_is_one_line_and_125(case, tmp_path, monkeypatch, capsys):
    if os.geteuid() == 0 and case.id in ("config-unreadable", "state-dir-unwritable"):
        pytest.skip("root reads and writes whatever the modes say")
    work = tmp_path / "work"
    work.mkdir()
    args, env = _materialise(case, work)
    state = tmp_path / "podtwin-state"
    monkeypatch.setenv("PODTWIN_STATE_DIR", str(state))
    monkeypatch.setenv("DOCKER_HOST", NUL_SOCKET)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["podtwin", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.run()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_.value.code == case.code, err
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("podtwin: ") and not line.endswith("(ignored)")]
    assert len(errors) == 1 and errors == lines[-1:], err
    assert case.expect in errors[0], err
    assert " — " in errors[0], f"no fix named: {errors[0]}"
    leftovers = list((state / "sessions").iterdir()) if (state / "sessions").is_dir() else []
    assert not leftovers, leftovers
