"""Kubernetes refusals become one line that says what refused, at which level, and what to do."""
from __future__ import annotations

import json

from podtwin.runner.adapters.kube import _handshake_message, pod_security_error

JOB_EVENT = ('Error creating: pods "podtwin-1-agent-x" is forbidden: violates PodSecurity "baseline:latest": '
             'non-default capabilities (container "agent" must not include "SYS_ADMIN", "SYS_PTRACE" in '
             'securityContext.capabilities.add), host namespaces (hostPID=true)')


def test_job_refused_by_pod_security_names_the_level_and_the_way_out():
    line = pod_security_error(JOB_EVENT, ephemeral=False, namespace="shop").one_line()
    assert "\n" not in line
    assert "Pod Security level 'baseline' of namespace shop refuses the agent Job's pod" in line
    assert "hostPID=true" in line and "agent.ephemeral: true" in line and "agent.namespace" in line


def test_ephemeral_refused_for_steal_says_why():
    message = ('pods "api-1" is forbidden: violates PodSecurity "baseline:v1.33": non-default capabilities '
               '(container "podtwin-1-agent" must not include "NET_ADMIN" in securityContext.capabilities.add)')
    line = pod_security_error(message, ephemeral=True).one_line()
    assert "level 'baseline' refuses the agent's ephemeral container" in line and "NET_ADMIN" in line
    assert "incoming.mode" in line


def test_refused_websocket_upgrade_gives_the_api_servers_message():
    status = {"kind": "Status", "message": 'pods "a" is forbidden: User "u" cannot get resource "pods/exec"',
              "code": 403}
    body = json.dumps(status).encode()   # websocket-client puts the body's repr in its message
    reason = f"Handshake status 403 Forbidden -+-+- {{'content-type': 'application/json'}} -+-+- {body!r}"
    assert _handshake_message(reason) == 'pods "a" is forbidden: User "u" cannot get resource "pods/exec"'
