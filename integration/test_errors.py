"""Bad input: one clear line naming the problem and the fix, a non-zero exit, nothing left behind."""
from __future__ import annotations

import signal
import time

import pytest

from conftest import APP_IMAGE, PODTWIN_IMAGE, docker, write_config
from podtwin.runner.config.image import agent_image_name

CONFIG = TARGET = INFRA = 125   # docker run's code for its own failures, whatever the kind (README)


def one_error_line(result, code: int) -> str:
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("podtwin:")]
    assert result.returncode == code, result.stderr
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


def test_unknown_target_suggests_close_names(podtwin, staging):
    typo = staging.target[:-1]
    line = one_error_line(podtwin.run("container", "run", "--target", f"container/{typo}", APP_IMAGE, "true"), TARGET)
    assert f"target container '{typo}' not found" in line
    assert staging.target in line  # did you mean ...


def test_target_not_running(podtwin, staging):
    name = staging.target + "-stopped"
    docker("create", "--name", name, "--label", "podtwin-test", APP_IMAGE, "true")
    try:
        line = one_error_line(podtwin.run("container", "run", "--target", f"container/{name}", APP_IMAGE, "true"), TARGET)
        assert "is not running" in line and "docker start" in line
    finally:
        docker("rm", "-f", name, check=False)


def test_app_image_missing(podtwin, staging):
    line = one_error_line(podtwin.run("container", "run", "--target", f"container/{staging.target}",
                                      "podtwin-test/no-such-image:1", "true"), INFRA)
    assert "podtwin-test/no-such-image:1" in line and "pull" in line


def test_podtwin_image_missing(podtwin, staging, tmp_path):
    cfg = write_config(tmp_path / "c.json", {"agent": {"image": "podtwin:no-such-tag"}})
    line = one_error_line(podtwin.run("container", "run", "-f", str(cfg), "--target",
                                      f"container/{staging.target}", APP_IMAGE, "true"), INFRA)
    assert "podtwin:no-such-tag" in line and "podtwin images build" in line


def test_docker_unreachable(podtwin, tmp_path):
    line = one_error_line(podtwin.run("container", "run", "--target", "container/x", APP_IMAGE, "true",
                                      env={"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}), INFRA)
    assert "Docker engine does not answer" in line


def test_bad_config_names_key_and_file(podtwin, tmp_path):
    cfg = write_config(tmp_path / "bad.json", {"feature": {"network": {"outgoingg": True}}})
    line = one_error_line(podtwin.run("container", "run", "-f", str(cfg), "--target", "container/x",
                                      APP_IMAGE, "true"), CONFIG)
    assert "feature.network.outgoingg" in line and "bad.json" in line


def test_bad_target_string(podtwin):
    line = one_error_line(podtwin.run("container", "run", "--target", "banana/x", APP_IMAGE, "true"), TARGET)
    assert "banana/x" in line and "container/NAME" in line


def test_unsupported_mirrord_key_is_reported(podtwin, staging, tmp_path):
    cfg = write_config(tmp_path / "mirrord.json", {"target": f"container/{staging.target}",
                                                   "feature": {"hostname": True}})
    result = podtwin.run("container", "run", "-f", str(cfg), APP_IMAGE, "true")
    assert result.returncode == 0, result.stderr
    assert "feature.hostname is not supported yet" in result.stderr


def test_doctor_on_a_working_and_a_broken_setup(podtwin, tmp_path):
    good = podtwin.run("doctor", env={"KUBECONFIG": str(tmp_path / "none")})
    assert good.returncode == 0, good.stdout
    assert "ok    Docker engine answers" in good.stdout and f"ok    image {PODTWIN_IMAGE} present" in good.stdout
    assert f"ok    image {agent_image_name()} present" in good.stdout
    # the files' needs, tried as a session does it, and nothing of the probe left behind
    assert "ok    /dev/fuse usable in a container" in good.stdout, good.stdout
    assert "ok    mount propagation from the sidecar to the app" in good.stdout, good.stdout
    assert not docker("ps", "-aq", "--filter", "label=podtwin.role=doctor").stdout.strip()
    assert not docker("volume", "ls", "-q", "--filter", "label=podtwin.role=doctor").stdout.strip()
    bad = podtwin.run("doctor", env={"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock",
                                     "KUBECONFIG": str(tmp_path / "none")})
    assert bad.returncode == 1
    assert "FAIL  the Docker engine does not answer" in bad.stdout and "make setup" in bad.stdout


def test_command_not_in_the_image_exits_127_as_docker_run(podtwin, staging):
    result = podtwin.run("container", "run", "-q", "--target", f"container/{staging.target}", APP_IMAGE, "/no-such-command")
    assert result.returncode == 127, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("podtwin: the app's command could not be started in ") and "/no-such-command" in line
    assert "Traceback" not in result.stderr


def test_network_host_is_refused_before_anything_starts(podtwin, staging):
    line = one_error_line(podtwin.run("container", "run", "--network", "host", "--target",
                                      f"container/{staging.target}", APP_IMAGE, "true"), CONFIG)
    assert "--network host cannot be used" in line


@pytest.mark.parametrize("delay", [0.4, 0.8, 1.2])
def test_ctrl_c_during_start_up_says_so_and_leaves_nothing(podtwin, staging, delay):
    """Ctrl-C at any point of the start-up (loading, agent, sidecar, link): exit 130, one line,
    no traceback; the podtwin fixture checks that nothing of the session is left."""
    proc = podtwin.start("container", "run", "--target", f"container/{staging.target}", APP_IMAGE, "sleep", "30")
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = proc.err_path.read_text()
    assert err.strip().splitlines()[-1].startswith("podtwin: interrupted") and "Traceback" not in err, err
