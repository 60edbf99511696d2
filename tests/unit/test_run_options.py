"""Run options no target could make work are refused before anything starts, in one line."""
from dataclasses import dataclass

import pytest

from podtwin.runner.errors import EXIT_CONFIG, ConfigError
from podtwin.runner.session.pipeline import check_options


@dataclass
class Options:
    image: str = "app:dev"
    network: str | None = None
    user: str | None = None
    as_target_user: bool = False
    env: dict = None

    def __post_init__(self):
        self.env = self.env or {}


@pytest.mark.parametrize("network,why", [
    ("host", "this machine's own network"),
    ("none", "no network to reach the target"),
    ("container:db", "not another container's"),
])
def test_networks_that_would_escape_the_session_are_refused(network, why):
    with pytest.raises(ConfigError) as err:
        check_options(Options(network=network))
    assert f"--network {network} cannot be used" in err.value.message and why in err.value.message
    assert err.value.exit_code == EXIT_CONFIG


@pytest.mark.parametrize("image", ["", "  "])
def test_an_empty_image_name_is_refused(image):
    with pytest.raises(ConfigError, match="no image given"):
        check_options(Options(image=image))


def test_a_named_network_and_an_image_pass():
    check_options(Options(network="my-compose_default"))
    check_options(Options())


def test_user_and_as_target_user_together_are_refused():
    with pytest.raises(ConfigError, match="--user and --as-target-user"):
        check_options(Options(user="1000", as_target_user=True))


def test_an_environment_value_no_program_could_start_with_is_named():
    with pytest.raises(ConfigError, match="environment variable BIG is 1,048,581 bytes"):
        check_options(Options(env={"BIG": "x" * (1 << 20)}))
