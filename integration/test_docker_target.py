"""`podtwin container run --target container/NAME`: what a user of the tool would check.

Each test runs the real CLI against the staging of conftest.py, with an unchanged static app
image, and the `podtwin` fixture fails the test if anything is left behind.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from conftest import APP_IMAGE, PODTWIN_IMAGE, docker, kill, session_containers, wait_until, write_config


def app_run(podtwin, staging, script: str, *extra: str, input: str | None = None):
    return podtwin.run("container", "run", "-q", "--target", f"container/{staging.target}", *extra,
                       APP_IMAGE, "sh", "-c", script, input=input)


def lines(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_env_exclude_override_and_dash_e(podtwin, staging, tmp_path):
    cfg = write_config(tmp_path / "podtwin.json", {"feature": {"env": {
        "exclude": "DB_*;FEATURE_Y", "override": {"REGION": "local-override"}}}})
    result = app_run(podtwin, staging,
                     "echo APP_MODE=$APP_MODE; echo DB_PASSWORD=${DB_PASSWORD:-unset}; "
                     "echo FEATURE_X=$FEATURE_X; echo FEATURE_Y=${FEATURE_Y:-unset}; echo REGION=$REGION; "
                     "echo EXTRA=$EXTRA; echo PATH=$PATH",
                     "-f", str(cfg), "-e", "EXTRA=from-cli", "-e", "APP_MODE=cli-wins")
    assert result.returncode == 0, result.stderr
    seen = lines(result.stdout)
    assert seen["APP_MODE"] == "cli-wins"          # -e wins over the target
    assert seen["DB_PASSWORD"] == "unset"           # excluded by pattern
    assert seen["FEATURE_X"] == "on"                # from the target
    assert seen["FEATURE_Y"] == "unset"             # excluded by name
    assert seen["REGION"] == "local-override"       # override
    assert seen["EXTRA"] == "from-cli"
    assert "/bin" in seen["PATH"]                   # the image's own PATH, not the target's


def test_env_include(podtwin, staging, tmp_path):
    cfg = write_config(tmp_path / "podtwin.yaml", {})
    (tmp_path / "podtwin.yaml").write_text("feature:\n  env:\n    include: 'FEATURE_*'\n")
    result = app_run(podtwin, staging, "echo FEATURE_X=$FEATURE_X; echo APP_MODE=${APP_MODE:-unset}",
                     "-f", str(cfg))
    assert result.returncode == 0, result.stderr
    assert lines(result.stdout) == {"FEATURE_X": "on", "APP_MODE": "unset"}


def test_dns_http_hosts_udp_from_the_targets_network(podtwin, staging):
    script = ("nslookup backend; echo ---; wget -qO- http://backend/dns; "
              "wget -qO- http://hosts-only.example/hosts; "
              f"wget -qO- http://{staging.backend_ip}/by-ip; "
              "udpsend backend:9000 ping-over-udp")
    result = app_run(podtwin, staging, script)
    assert result.returncode == 0, result.stdout + result.stderr
    dns_part, _, rest = result.stdout.partition("---")
    assert staging.backend_ip in dns_part                     # a name only the target's network knows
    assert "you asked for /dns" in rest                        # HTTP by that name
    assert "you asked for /hosts" in rest                      # a name from the target's /etc/hosts
    assert "you asked for /by-ip" in rest                      # an internal IP, unreachable from here
    assert "echo:ping-over-udp" in rest                        # UDP request, answered


def test_names_that_fail_remotely_fail_for_the_app(podtwin, staging):
    """A name the target cannot resolve does not resolve for the app either (no fallback to the
    host's resolver), and a name the target resolves does."""
    in_target = docker("exec", staging.target, "python3", "-c",
                       "import socket; socket.gethostbyname('no-such-name.invalid')", check=False)
    assert in_target.returncode != 0
    result = app_run(podtwin, staging, "nslookup no-such-name.invalid; echo rc=$?; nslookup backend; echo rc=$?")
    codes = [ln for ln in result.stdout.splitlines() if ln.startswith("rc=")]
    assert codes[0] != "rc=0" and codes[1] == "rc=0", result.stdout


def test_loopback_stays_local(podtwin, staging):
    script = ("mkdir -p /tmp/www && echo local-listener > /tmp/www/index.html && "
              "httpd -p 127.0.0.1:8080 -h /tmp/www && wget -qO- http://127.0.0.1:8080/")
    result = app_run(podtwin, staging, script)
    assert result.returncode == 0, result.stderr
    assert "local-listener" in result.stdout


def test_outgoing_filter_keeps_matching_traffic_local(podtwin, staging, tmp_path):
    cfg = write_config(tmp_path / "local.json", {"feature": {"network": {"outgoing": {
        "filter": {"local": [f"{staging.backend_ip}/32"]}}}}})
    # (busybox's own `wget -T` crashes in Debian's static build, so `timeout` bounds the attempt)
    result = app_run(podtwin, staging, f"timeout 5 wget -qO- http://{staging.backend_ip}/; echo rc=$?", "-f", str(cfg))
    assert "rc=0" not in result.stdout   # kept local: the internal network is unreachable from here
    cfg = write_config(tmp_path / "remote.json", {"feature": {"network": {"outgoing": {
        "filter": {"remote": [f"{staging.backend_ip}:80"]}}}}})
    result = app_run(podtwin, staging, f"timeout 5 wget -qO- http://{staging.backend_ip}/remote", "-f", str(cfg))
    assert "you asked for /remote" in result.stdout, result.stderr


def test_exit_code_and_stdin(podtwin, staging):
    result = app_run(podtwin, staging, "exit 7")
    assert result.returncode == 7
    result = app_run(podtwin, staging, 'read line; echo "got:$line"', "-i", input="hello stdin\n")
    assert result.returncode == 0, result.stderr
    assert "got:hello stdin" in result.stdout


def test_crashed_app_leaves_nothing(podtwin, staging):
    # A process that dies of SIGSEGV (PID 1 itself would ignore a signal sent with kill).
    result = app_run(podtwin, staging, "sh -c 'kill -SEGV $$'; exit $?")
    assert result.returncode == 139


def start_session(podtwin, staging):
    proc = podtwin.start("container", "run", "-q", "--target", f"container/{staging.target}",
                         APP_IMAGE, "sleep", "300")
    wait_until(lambda: any(n.endswith("-app") for n in session_containers("app", proc))
               and docker("ps", "--filter", "label=podtwin.role=app", "--filter",
                          f"label=podtwin.runner-pid={proc.pid}", "-q").stdout.strip(), 60,
               "the app container to run")
    return proc


def test_ctrl_c_tears_everything_down(podtwin, staging):
    proc = start_session(podtwin, staging)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130, proc.err_path.read_text()


def test_sigkill_of_the_runner(podtwin, staging):
    """The guard removes everything after the runner is SIGKILLed."""
    proc = start_session(podtwin, staging)
    proc.kill()
    proc.wait(timeout=10)
    wait_until(lambda: not podtwin.leftovers(), 10, "the session to be cleaned up")
    assert docker("inspect", "-f", "{{.State.Running}}", staging.target).stdout.strip() == "true"


def test_a_stopped_runner_reconnects_and_the_session_goes_on(podtwin, staging, tmp_path):
    """SIGSTOP of the runner (a laptop asleep): the agent misses its keepalives and drops the
    link, but keeps the session (the runner still holds its lock); after SIGCONT the runner
    connects again and the app, which never stopped, still reaches the target's network."""
    cfg = write_config(tmp_path / "c.json", {"agent": {"communication_timeout": 2}})
    proc = podtwin.start("container", "run", "-f", str(cfg), "--target", f"container/{staging.target}",
                         APP_IMAGE, "sh", "-c", "sleep 300")
    wait_until(lambda: docker("ps", "-q", "--filter", "label=podtwin.role=app", "--filter",
                              f"label=podtwin.runner-pid={proc.pid}").stdout.strip(), 60, "the app container to run")
    app, agent = session_containers("app", proc)[0], session_containers("agent", proc)[0]
    kill(proc.pid, signal.SIGSTOP)
    try:   # the agent gives up on the silent link after ~3 s, and keeps the session
        wait_until(lambda: "keeping the session" in docker("logs", agent, check=False).stderr, 30,
                   "the agent to see the link break")
    finally:
        kill(proc.pid, signal.SIGCONT)
    wait_until(lambda: "link back after" in proc.err_path.read_text() or proc.poll() is not None, 30,
               "the link to come back")
    err = proc.err_path.read_text()
    assert proc.poll() is None and "link lost, reconnecting" in err, err
    assert session_containers("app", proc) == [app]
    fetched = docker("exec", app, "wget", "-qO-", f"http://{staging.backend_ip}/again", check=False)
    assert "you asked for /again" in fetched.stdout, fetched.stdout + fetched.stderr
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130, proc.err_path.read_text()


def test_agent_and_sidecar_remove_themselves_without_the_guard(podtwin, staging):
    """Even if the runner and its guard both die, agent and sidecar notice and go within 10 s;
    `podtwin clean` then removes the app container the dead session left."""
    proc = start_session(podtwin, staging)
    sid = docker("inspect", "-f", '{{index .Config.Labels "podtwin.session"}}',
                 session_containers("app", proc)[0]).stdout.strip()
    # only this session's guard (started by this test's runner), found by its session id
    guards = subprocess.run(["pgrep", "-f", f"podtwin.runner.session.reaper --session {sid} "],
                            capture_output=True, text=True)
    assert guards.stdout.split(), "the session's guard is not running"
    for pid in guards.stdout.split():
        kill(int(pid))
    proc.kill()
    proc.wait(timeout=10)
    start = time.monotonic()
    wait_until(lambda: not session_containers("agent", proc) and not session_containers("sidecar", proc), 10,
               "agent and sidecar to exit")
    assert time.monotonic() - start < 10
    listing = podtwin.run("sessions")
    assert "dead" in listing.stdout, listing.stdout
    cleaned = podtwin.run("clean")
    assert cleaned.returncode == 0 and "removed" in cleaned.stdout, cleaned.stdout + cleaned.stderr


def test_target_stopping_ends_the_session(podtwin, staging):
    """The agent dies with the target's PID namespace; the runner notices and stops the app."""
    name = staging.target + "-short"
    docker("run", "-d", "--name", name, "--label", "podtwin-test", "--network", staging.network,
           PODTWIN_IMAGE, "sleep", "infinity")
    try:
        proc = podtwin.start("container", "run", "--target", f"container/{name}", APP_IMAGE, "sleep", "300")
        wait_until(lambda: docker("ps", "--filter", "label=podtwin.role=app", "--filter",
                                  f"label=podtwin.runner-pid={proc.pid}", "-q").stdout.strip(), 60,
                   "the app container to run")
        docker("rm", "-f", name)
        assert proc.wait(timeout=20) != 0
        assert "link to the agent was lost" in proc.err_path.read_text()
    finally:
        docker("rm", "-f", name, check=False)


def test_tty_with_t(podtwin, staging):
    """With -i -t on a real terminal the app gets a TTY, as with `docker run -it`."""
    import os
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(podtwin.cmd("container", "run", "-q", "-i", "-t", "--target",
                                            f"container/{staging.target}", APP_IMAGE,
                                            "sh", "-c", "tty; echo cols=$(stty size); exit 3"),
                                stdin=slave, stdout=slave, stderr=slave, env=podtwin.env,
                                start_new_session=True)
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every process holding the terminal has exited
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=60) == 3
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = out.decode(errors="replace")
    assert "/dev/pts/" in text, text
    assert "cols=" in text and "not a tty" not in text, text


@pytest.fixture
def local_service(staging):
    """A local Docker network with a service on it that only local containers reach."""
    net, name = staging.network + "-local", staging.target + "-localsvc"
    docker("network", "create", "--label", "podtwin-test", net)
    docker("run", "-d", "--name", name, "--label", "podtwin-test", "--network", net, APP_IMAGE,
           "sh", "-c", "mkdir -p /w && echo local-service > /w/index.html && httpd -f -p 80 -h /w")
    yield net, name
    docker("rm", "-f", name, check=False)
    docker("network", "rm", net, check=False)


def test_filters_by_host_name_split_local_and_remote(podtwin, staging, local_service, tmp_path):
    """`local` lists with a host name: that name resolves and connects locally, the rest of the
    session still goes through the target."""
    net, svc = local_service
    cfg = write_config(tmp_path / "names.json", {"feature": {"network": {
        "outgoing": {"filter": {"local": [svc]}}, "dns": {"filter": {"local": [svc]}}}}})
    result = app_run(podtwin, staging, f"wget -qO- http://{svc}/; wget -qO- http://backend/both; "
                     "udpsend backend:9000 remote-udp", "--network", net, "-f", str(cfg))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "local-service" in result.stdout
    assert "you asked for /both" in result.stdout
    assert "echo:remote-udp" in result.stdout


def test_remote_list_with_a_host_name(podtwin, staging, tmp_path):
    """Only `backend:80` goes remote: HTTP to it works, UDP to it (not listed) stays local."""
    cfg = write_config(tmp_path / "remote.json", {"feature": {"network": {
        "outgoing": {"filter": {"remote": ["backend:80"]}}}}})
    result = app_run(podtwin, staging, "wget -qO- http://backend/listed; udpsend backend:9000 x 2; "
                     "echo udp=$?", "-f", str(cfg))
    assert "you asked for /listed" in result.stdout, result.stderr
    assert "udp=1" in result.stdout


def test_dns_off_resolves_locally(podtwin, staging, local_service, tmp_path):
    net, svc = local_service
    cfg = write_config(tmp_path / "nodns.json", {"feature": {"network": {"dns": False}}})
    result = app_run(podtwin, staging, f"nslookup {svc} >/dev/null; echo local=$?; "
                     "nslookup backend >/dev/null; echo remote=$?", "--network", net, "-f", str(cfg))
    assert "local=0" in result.stdout and "remote=1" in result.stdout, result.stdout + result.stderr


def test_cli_extra_args_publish_the_apps_port_through_the_sidecar(podtwin, staging, tmp_path):
    """container.cli_extra_args: -p goes to the sidecar (which owns the app's network namespace),
    so the app's port is reachable from this machine; -l labels the app container."""
    host_port = free_port()
    cfg = write_config(tmp_path / "publish.json", {
        "feature": {"network": {"incoming": "off"}},
        "container": {"cli_extra_args": ["-p", f"127.0.0.1:{host_port}:8080", "--label", "team=payments"]}})
    proc = podtwin.start("container", "run", "-f", str(cfg), "--target", f"container/{staging.target}",
                         APP_IMAGE, "sh", "-c",
                         "mkdir -p /tmp/www && echo published-app > /tmp/www/index.html && "
                         "exec httpd -f -p 8080 -h /tmp/www")

    try:
        wait_until(lambda: http_answer(host_port) == "published-app" or proc.poll() is not None, 60,
                   "the published port")
        assert proc.poll() is None, proc.err_path.read_text()
        app = session_containers("app", runner=proc)
        assert len(app) == 1
        labels = docker("inspect", "-f", "{{json .Config.Labels}}", app[0]).stdout
        assert '"team":"payments"' in labels and '"podtwin.role":"app"' in labels
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130


def test_cli_extra_args_refuses_a_network_flag_in_one_line(podtwin, staging, tmp_path):
    cfg = write_config(tmp_path / "net.json", {"container": {"cli_extra_args": ["--network", "host"]}})
    result = app_run(podtwin, staging, "true", "-f", str(cfg))
    assert result.returncode == 125
    assert result.stderr.strip().splitlines()[-1].startswith(
        "podtwin: container.cli_extra_args: --network is not allowed")


def test_mirrords_container_form_and_docker_run_flags(podtwin, staging, tmp_path):
    """`podtwin container [OPTIONS] -- docker run [FLAGS] IMAGE [CMD]`, mirrord's form: docker's
    flags as docker takes them (-e, --env-file, -p, --name, -l, -it combined, --cap-add through
    container.cli_extra_args); the app's port published on this machine through the sidecar."""
    host_port = free_port()
    (tmp_path / "app.env").write_text("FROM_FILE=file\nBOTH=file\n")
    name = f"pt-form-{staging.target[-6:]}"
    proc = podtwin.start("container", "--target", f"container/{staging.target}", "-q", "--",
                         "docker", "run", "--rm", "-e", "BOTH=flag", f"--env-file={tmp_path / 'app.env'}",
                         "-p", f"127.0.0.1:{host_port}:8080", "--name", name, "-l", "team=payments",
                         "--cap-add", "NET_BIND_SERVICE", APP_IMAGE, "sh", "-c",
                         "echo APP_MODE=$APP_MODE FROM_FILE=$FROM_FILE BOTH=$BOTH; mkdir -p /tmp/www && "
                         "echo published-app > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www")

    try:
        wait_until(lambda: http_answer(host_port) == "published-app" or proc.poll() is not None, 60,
                   "the published port")
        assert proc.poll() is None, proc.err_path.read_text()
        assert "APP_MODE=staging FROM_FILE=file BOTH=flag" in proc.out_path.read_text()   # -e over --env-file
        inspect = json.loads(docker("inspect", name).stdout)[0]
        assert inspect["Config"]["Labels"]["team"] == "payments" and inspect["Config"]["Labels"]["podtwin.role"] == "app"
        assert "NET_BIND_SERVICE" in inspect["HostConfig"]["CapAdd"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130


@pytest.mark.parametrize("args,expect", [
    (["--", "docker", "run", "-di", APP_IMAGE], "-d and -i cannot go together"),
    (["--", "docker", "run", "--add-host", "a:10.0.0.1", APP_IMAGE], "--add-host is not allowed"),
    (["--", "docker", "run", "--privileged", APP_IMAGE], "--privileged is not supported"),
    (["--", "docker", "build", "."], "after --, give the `docker run` command"),
])
def test_docker_run_flags_podtwin_cannot_honour_are_one_line(podtwin, staging, args, expect):
    result = podtwin.run("container", "--target", f"container/{staging.target}", *args)
    assert result.returncode == 125, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert expect in line and "Traceback" not in result.stderr, result.stderr


def test_detached_session_and_podtwin_stop(podtwin, staging):
    """`docker run -d`'s contract: the app container's id on stdout, exit 0, the app running with
    the target's env and network; `podtwin sessions` lists it; `podtwin stop ID` ends it and
    removes everything (the fixture checks that nothing is left)."""
    name = f"pt-detached-{staging.target[-6:]}"
    result = podtwin.run("container", "--target", f"container/{staging.target}", "-q", "--", "docker", "run", "-d",
                         "--name", name, APP_IMAGE, "sh", "-c",
                         "echo APP_MODE=$APP_MODE $(wget -qO- http://backend/ | head -c 18); "
                         "trap 'exit 0' TERM; while sleep 1; do :; done")
    assert result.returncode == 0, result.stderr
    app_id = result.stdout.strip()
    assert docker("inspect", "-f", "{{.Name}} {{.State.Running}}", app_id).stdout.strip() == f"/{name} true"
    wait_until(lambda: "APP_MODE=staging hello from backend" in docker("logs", name).stdout, 10, "the app's output")
    session = next(line.split()[0] for line in podtwin.run("sessions").stdout.splitlines() if f"app:{name}" in line)
    stopped = podtwin.run("stop", app_id[:12])
    assert stopped.returncode == 0 and stopped.stdout.strip() == session, stopped.stderr
    assert docker("ps", "-a", "-q", "--filter", f"name={name}").stdout.strip() == ""
    again = podtwin.run("stop", session)
    assert again.returncode == 125 and f"no podtwin session '{session}'" in again.stderr


def free_port() -> int:
    """A free port on this machine's loopback."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_answer(port: int) -> str | None:
    """The body of GET / on this machine's loopback port, or None while nothing answers."""
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
            return resp.read().decode().strip()
    except OSError:
        return None
