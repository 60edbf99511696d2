"""Target strings -> frozen specs, and back."""
from __future__ import annotations

import dataclasses

import pytest

from podtwin.runner.errors import TargetError
from podtwin.runner.targets import DockerTarget, KubeTarget, parse_target, target_from_mirrord_path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("container/api", DockerTarget("api")),
        ("container/my_app.v2-1", DockerTarget("my_app.v2-1")),
        ("pod/web-0", KubeTarget("pod", "web-0")),
        ("deployment/client", KubeTarget("deployment", "client")),
        ("deploy/client", KubeTarget("deployment", "client")),
        ("statefulset/db", KubeTarget("statefulset", "db")),
        ("sts/db", KubeTarget("statefulset", "db")),
        ("stateful_set/db", KubeTarget("statefulset", "db")),
        ("job/migrate", KubeTarget("job", "migrate")),
        ("cronjob/nightly", KubeTarget("cronjob", "nightly")),
        ("cron_job/nightly", KubeTarget("cronjob", "nightly")),
        ("service/api", KubeTarget("service", "api")),
        ("svc/api", KubeTarget("service", "api")),
        ("replica_set/api-5d9f", KubeTarget("replicaset", "api-5d9f")),
        ("pod/web-0/container/app", KubeTarget("pod", "web-0", "app")),
        ("Deploy/client/container/side-car", KubeTarget("deployment", "client", "side-car")),
        ("  pod/web-0  ", KubeTarget("pod", "web-0")),
    ],
)
def test_parses_accepted_forms(text: str, expected: object) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize(
    "text",
    ["container/api", "pod/web-0", "deployment/client/container/app", "sts/db", "svc/a.b"],
)
def test_str_round_trips(text: str) -> None:
    target = parse_target(text)
    assert parse_target(str(target)) == target


def test_str_is_canonical() -> None:
    assert str(parse_target("deploy/client/container/app")) == "deployment/client/container/app"
    assert str(parse_target("cron_job/x")) == "cronjob/x"


def test_targets_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse_target("pod/x").name = "y"  # type: ignore[misc]


@pytest.mark.parametrize(
    "text",
    ["", "api", "pod", "pod/", "pod/Web", "pod/a/b", "pod/a/container", "pod/a/box/c",
     "pod/a/container/C_1", "container/", "container/a/b", "container/-x", "widget/x"],
)
def test_bad_strings_name_the_accepted_forms(text: str) -> None:
    with pytest.raises(TargetError) as info:
        parse_target(text)
    assert "container/NAME" in info.value.hint
    assert "deployment/NAME" in info.value.hint


@pytest.mark.parametrize(("text", "why"), [("rollout/api", "Rollouts"), ("labels/app=x", "label selectors")])
def test_mirrord_kinds_we_do_not_support_say_so(text: str, why: str) -> None:
    with pytest.raises(TargetError, match=why):
        parse_target(text)


def test_targetless_is_a_target_of_its_own() -> None:
    assert str(parse_target("targetless")) == "targetless" == str(parse_target(" Targetless "))


def test_mirrord_object_path() -> None:
    assert target_from_mirrord_path({"pod": "bear", "container": "c"}) == "pod/bear/container/c"
    with pytest.raises(TargetError):
        target_from_mirrord_path({"pod": "a", "deployment": "b"})
