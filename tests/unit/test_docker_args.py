"""container.cli_extra_args: docker run flags split between the sidecar (ports) and the app."""
import pytest

from podtwin.runner.config.docker_args import parse_extra_args
from podtwin.runner.errors import ConfigError


def test_publish_goes_to_the_sidecar_in_every_docker_form():
    extra = parse_extra_args(["-p", "8080:80", "--publish=127.0.0.1:9000:90/udp", "-p", "7000", "-p", ":81"])
    assert extra.ports == {"80/tcp": 8080, "90/udp": ("127.0.0.1", 9000), "7000/tcp": None, "81/tcp": None}
    assert extra.app == {}


def test_app_flags_become_sdk_keywords():
    extra = parse_extra_args(["-v", "/a:/b", "--volume=/c:/d:ro", "-l", "team=x", "--cap-add", "SYS_PTRACE",
                              "--tmpfs", "/run:size=1m", "-m", "256m", "--cpus", "1.5", "--read-only", "--init"])
    assert extra.ports == {}
    assert extra.app == {"volumes": ["/a:/b", "/c:/d:ro"], "labels": {"team": "x"}, "cap_add": ["SYS_PTRACE"],
                         "tmpfs": {"/run": "size=1m"}, "mem_limit": "256m", "nano_cpus": 1_500_000_000,
                         "read_only": True, "init": True}


@pytest.mark.parametrize("args,named", [
    (["--network", "host"], "--network is not allowed"),
    (["--hostname=x"], "--hostname is not allowed"),
    (["--pid=host"], "--pid is not supported"),
    (["-p"], "-p needs a value"),
    (["-p", "80:80:80:80"], "is not [IP:][HOST_PORT:]PORT"),
    (["-p", "70000:80"], "out of range"),
    (["8080:80"], "is not a flag"),
    (["--cpus", "lots"], "is not a number"),
])
def test_refusals_name_the_flag(args, named):
    with pytest.raises(ConfigError) as err:
        parse_extra_args(args)
    assert named in err.value.message and "container.cli_extra_args" in err.value.message
