"""podtwin's settings: nested, documented, inert models that read mirrord config files unchanged.

Every field carries a one-line description; those lines feed `--help`, `config_schema()` and
docs/config.md. Reading config never touches Docker or the cluster; `configfile` finds, reads and
merges the files these models validate.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt
from pydantic import field_validator, model_validator

from podtwin.runner.env import split_patterns
from podtwin.runner.errors import TargetError
from podtwin.runner.sidecar.outgoing.policy import parse_filter_entry
from podtwin.runner.targets import Target, parse_target, target_from_mirrord_path

# Strict: a string is not a bool ("yes"), a bool is not a number (true), as mirrord's own parser.
Port = Annotated[StrictInt, Field(ge=1, le=65535)]


def _shorthand(expand: Callable[[Any], Any], accepted: str, input_type: Any) -> BeforeValidator:
    """mirrord lets many sections be a bool or a string instead of an object; expand those."""

    def validate(value: Any) -> Any:
        if isinstance(value, (dict, BaseModel)):
            return value
        if value is None:  # `key: null` means "the default", as in mirrord
            return {}
        out = expand(value)
        if out is None:
            raise ValueError(f"expected {accepted}, got {value!r}")
        return out

    return BeforeValidator(validate, json_schema_input_type=input_type)


def _enabled(value: Any) -> Any:
    return {"enabled": value} if isinstance(value, bool) else None


def _as_list(value: Any) -> Any:
    """mirrord's "a single value or a list"; `;`-separated strings split like mirrord does."""
    return split_patterns(value) if isinstance(value, str) else value


def _as_strings(value: Any) -> Any:
    """YAML turns `PORT: 8080` into an int and `on: true` into a bool; values here are strings."""
    if not isinstance(value, dict):
        return value
    conv = {True: "true", False: "false"}
    return {k: conv[v] if isinstance(v, bool) else str(v) if isinstance(v, (int, float)) else v
            for k, v in value.items()}


Patterns = Annotated[
    list[str] | None, BeforeValidator(_as_list, json_schema_input_type=str | list[str] | None)]
StrList = Annotated[list[str], BeforeValidator(_as_list, json_schema_input_type=str | list[str])]
StrMap = Annotated[dict[str, str], BeforeValidator(_as_strings)]


class _Model(BaseModel):
    # Unknown keys are errors, and loaded settings cannot be changed behind the loader's back.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TargetConfig(_Model):
    path: str | None = Field(
        None, description="What to borrow from: container/NAME, pod/NAME, deployment/NAME[/container/C], ...")
    namespace: str | None = Field(
        None, description="Kubernetes namespace of the target; default: the kube context's namespace.")

    @model_validator(mode="before")
    @classmethod
    def _unwrapped(cls, value: Any) -> Any:
        """mirrord also takes the object form without its ``path`` wrapper:
        ``{"deployment": "api", "container": "app"}``."""
        if isinstance(value, dict) and not {"path", "namespace"} & set(value) and value:
            return {"path": value}
        return value

    @field_validator("path", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        try:
            if isinstance(value, dict):  # mirrord's {"pod": "x", "container": "c"} form
                value = target_from_mirrord_path(value)
            return None if value is None else str(parse_target(value))
        except TargetError as exc:
            raise ValueError(f"{exc.message}; {exc.hint}") from exc


class EnvConfig(_Model):
    enabled: StrictBool = Field(
        True, description="Copy the target's environment variables into the local container.")
    include: Patterns = Field(
        None, description="Copy only these variables: a list or `;`-separated names; `*` and `?` are wildcards.")
    exclude: Patterns = Field(
        None, description="Copy all variables except these: a list or `;`-separated names; `*` and `?` are wildcards.")
    override: StrMap = Field(
        default_factory=dict, description="Set these variables to these values, whatever the target has.")
    unset: StrList = Field(
        default_factory=list, description="Remove these variables (case-insensitive) unless override or -e sets them.")
    env_file: Path | None = Field(
        None, description="Add KEY=VALUE lines from this file, below override and -e; relative to the working directory.")

    @model_validator(mode="after")
    def _check(self) -> EnvConfig:
        if self.include is not None and self.exclude is not None:
            raise ValueError("include and exclude are mutually exclusive; set only one")
        if any(not k or "=" in k or "\0" in k for k in self.override):
            raise ValueError("override names must be non-empty and contain no '='")
        return self


def _regex(value: Any) -> Any:
    """A filter regex must compile here, at load, as the agent will compile it (Python's re)."""
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regex ({exc})") from None
    return value


def _method(value: Any) -> Any:
    if isinstance(value, str) and not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", value):
        raise ValueError("an HTTP method is a non-empty token, e.g. GET or POST")
    return value


def _rust_regex(value: Any) -> Any:
    """mirrord's regexes are Rust's: its named groups ``(?<name>...)`` are Python's ``(?P<name>...)``."""
    return re.sub(r"\(\?<(?=[A-Za-z_])", "(?P<", value) if isinstance(value, str) else value


Regex = Annotated[str, AfterValidator(_regex)]
PathRegex = Annotated[str, BeforeValidator(_rust_regex), AfterValidator(_regex)]
PathRegexList = Annotated[list[PathRegex], BeforeValidator(_as_list, json_schema_input_type=str | list[str])]
Method = Annotated[str, AfterValidator(_method)]


class HttpFilterRule(_Model):
    header: Regex | None = Field(
        None, description="Regex searched in each `name: value` header line (name lowercased, value as sent).")
    path: Regex | None = Field(
        None, description="Regex searched in the request path with its query string.")
    method: Method | None = Field(None, description="HTTP method to match, case-insensitive.")

    @model_validator(mode="before")
    @classmethod
    def _exactly_one(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "body" in data:  # ignoring it would steal more than the user asked for
                raise ValueError("body filters are not supported yet")
            if sum(data.get(k) is not None for k in ("header", "path", "method")) != 1:
                raise ValueError("each rule needs exactly one of header, path, method")
        return data


class HttpFilterConfig(_Model):
    header_filter: Regex | None = Field(
        None, description="Steal requests with a `name: value` header line (name lowercased) matching this regex.")
    path_filter: Regex | None = Field(
        None, description="Steal requests whose path (with query string) matches this regex.")
    method_filter: Method | None = Field(
        None, description="Steal requests with this HTTP method (case-insensitive).")
    any_of: list[HttpFilterRule] | None = Field(
        None, description="Requests matching at least one of these rules are mirrored/stolen.")
    all_of: list[HttpFilterRule] | None = Field(
        None, description="Requests matching every one of these rules are mirrored/stolen.")
    ports: list[Port] | None = Field(
        None, description="Apply the HTTP filter on these ports (others are stolen whole); default: 80 and 8080, as in mirrord.")

    @model_validator(mode="after")
    def _one_kind(self) -> HttpFilterConfig:
        kinds = ("header_filter", "path_filter", "method_filter", "any_of", "all_of")
        given = [k for k in kinds if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"use only one of {', '.join(kinds)} (got {', '.join(given)})")
        if self.any_of == [] or self.all_of == []:
            raise ValueError("any_of/all_of cannot be an empty list")
        if not given:
            raise ValueError("names no filter: set header_filter, path_filter, method_filter, any_of or all_of "
                             "(or remove http_filter to take every request)")
        return self


def _incoming(value: Any) -> Any:
    if isinstance(value, bool):
        return {"mode": "mirror" if value else "off"}
    return {"mode": value} if isinstance(value, str) else None


class IncomingConfig(_Model):
    mode: Literal["mirror", "steal", "off"] = Field(
        "mirror", description="mirror: copy the target's incoming traffic here; steal: take it; off: leave it.")
    ports: list[Port] | None = Field(
        None, description="Only mirror/steal these remote ports; default: every port the app listens on.")
    ignore_ports: list[Port] = Field(
        default_factory=list, description="Never mirror/steal these ports (mutually exclusive with ports).")
    port_mapping: list[tuple[Port, Port]] = Field(
        default_factory=list, description="[[local, remote], ...]: the app listens on local, traffic comes from remote.")
    http_filter: HttpFilterConfig | None = Field(
        None, description="Only mirror/steal HTTP requests matching this filter.")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @model_validator(mode="after")
    def _ports(self) -> IncomingConfig:
        if self.ports is not None and self.ignore_ports:
            raise ValueError("ports and ignore_ports are mutually exclusive; set only one")
        remotes = [remote for _, remote in self.port_mapping]
        twice = sorted({r for r in remotes if remotes.count(r) > 1})
        if twice:
            raise ValueError(f"port_mapping maps several local ports to remote port {twice[0]}; "
                             "one remote port goes to one local port")
        locals_ = [local for local, _ in self.port_mapping]
        twice = sorted({p for p in locals_ if locals_.count(p) > 1})
        if twice:
            raise ValueError(f"port_mapping maps local port {twice[0]} to several remote ports; "
                             "one local port takes one remote port")
        return self


class AddressFilterConfig(_Model):
    remote: Patterns = Field(
        None, description="Only these destinations go through the target; everything else stays local.")
    local: Patterns = Field(
        None, description="These destinations stay local; everything else goes through the target.")

    @model_validator(mode="after")
    def _exactly_one(self) -> AddressFilterConfig:
        if (self.remote is None) == (self.local is None):
            raise ValueError("give exactly one of remote or local")
        for entry in self.remote if self.remote is not None else self.local or []:
            parse_filter_entry(entry)  # raises ValueError naming the entry
        return self


class DnsFilterConfig(AddressFilterConfig):
    @model_validator(mode="after")
    def _no_protocol(self) -> DnsFilterConfig:
        if any("://" in e for e in (self.remote or self.local or [])):
            raise ValueError("DNS filter entries take no protocol (tcp:// or udp://)")
        return self


def _outgoing(value: Any) -> Any:
    if isinstance(value, bool):
        return {"tcp": value, "udp": value}
    if isinstance(value, str):  # mirrord also documents `"outgoing": "remote"` / `"local"`
        return {"remote": {}, "local": {"tcp": False, "udp": False}}.get(value)
    return None


class OutgoingConfig(_Model):
    tcp: StrictBool = Field(True, description="Send outgoing TCP connections through the target.")
    udp: StrictBool = Field(True, description="Send outgoing UDP traffic through the target.")
    ignore_localhost: StrictBool = Field(
        False, description="mirrord compatibility; in podtwin loopback traffic always stays local.")
    filter: AddressFilterConfig | None = Field(
        None, description="{remote: [...]} or {local: [...]}: entries like host:port, CIDR, :port, tcp://CIDR:port.")


class DnsConfig(_Model):
    enabled: StrictBool = Field(
        True, description="Resolve names with the target's DNS (its resolv.conf and search domains).")
    filter: DnsFilterConfig | None = Field(
        None, description="{remote: [...]} or {local: [...]}: names, IPs, CIDRs, optional :port.")


IncomingField = Annotated[IncomingConfig, _shorthand(
    _incoming, "true/false, 'mirror', 'steal', 'off' or an object",
    bool | Literal["mirror", "steal", "off"] | IncomingConfig)]
OutgoingField = Annotated[OutgoingConfig, _shorthand(
    _outgoing, "true/false or an object", bool | Literal["remote", "local"] | OutgoingConfig)]
DnsField = Annotated[DnsConfig, _shorthand(_enabled, "true/false or an object", bool | DnsConfig)]


class NetworkConfig(_Model):
    incoming: IncomingField = Field(
        default_factory=IncomingConfig, description="Traffic arriving at the target: mirror (default), steal or off.")
    outgoing: OutgoingField = Field(
        default_factory=OutgoingConfig, description="Connections the app makes: through the target (default) or local.")
    dns: DnsField = Field(
        default_factory=DnsConfig, description="Name resolution: through the target (default) or local.")


def _fs(value: Any) -> Any:
    if isinstance(value, bool):
        return {"mode": "read" if value else "local"}
    return {"mode": value.lower()} if isinstance(value, str) else None


class FsConfig(_Model):
    mode: Literal["read", "write", "local", "localwithoverrides"] = Field(
        "read", description="Default for file access: read (remote, read-only), write, local, localwithoverrides.")
    read_only: PathRegexList = Field(
        default_factory=list, description="Path regexes read from the target, read-only.")
    read_write: PathRegexList = Field(
        default_factory=list, description="Path regexes read and written on the target.")
    local: PathRegexList = Field(
        default_factory=list, description="Path regexes always served from the local container.")
    not_found: PathRegexList = Field(
        default_factory=list, description="Path regexes that appear not to exist.")
    mapping: dict[PathRegex, str] = Field(
        default_factory=dict, description="Path regex -> replacement ($1, ${name}), applied before the rules above.")

    def may_write(self) -> bool:
        """Whether a session may write the target's files (the agent then needs the rights to)."""
        return self.mode == "write" or bool(self.read_write)


def _network(value: Any) -> Any:
    if isinstance(value, bool):
        return {} if value else {"incoming": "off", "outgoing": False, "dns": False}
    return None


EnvField = Annotated[EnvConfig, _shorthand(_enabled, "true/false or an object", bool | EnvConfig)]
NetworkField = Annotated[NetworkConfig, _shorthand(_network, "true/false or an object", bool | NetworkConfig)]
FsField = Annotated[FsConfig, _shorthand(_fs, "true/false, a mode name or an object", bool | str | FsConfig)]


class FeatureConfig(_Model):
    env: EnvField = Field(
        default_factory=EnvConfig, description="The target's environment variables, filtered.")
    network: NetworkField = Field(
        default_factory=NetworkConfig, description="Incoming traffic, outgoing traffic and DNS.")
    fs: FsField = Field(
        default_factory=FsConfig, description="The target's files: its volume mounts at their real paths.")


class ImagePullSecret(_Model):
    name: str = Field(description="Name of a Secret of type kubernetes.io/dockerconfigjson.")


class AgentResources(_Model):
    requests: StrMap = Field(
        default_factory=dict, description="Resource requests, e.g. {cpu: 1m, memory: 1Mi}.")
    limits: StrMap = Field(
        default_factory=dict, description="Resource limits, e.g. {cpu: 100m, memory: 100Mi}.")


def _image(value: Any) -> Any:
    if isinstance(value, dict) and set(value) <= {"registry", "tag"} and "registry" in value:
        return f"{value['registry']}:{value['tag']}" if value.get("tag") else value["registry"]
    return value  # mirrord's {registry, tag} object, or a plain image reference


class AgentConfig(_Model):
    image: Annotated[str | None, BeforeValidator(_image)] = Field(
        None, description="Agent image (or mirrord's {registry, tag}); default: podtwin's agent of this version.")
    ttl: StrictInt = Field(
        1, ge=0, le=86400, description="Seconds the agent pod is kept after the agent exits (to read its logs).")
    startup_timeout: StrictInt = Field(
        60, ge=1, le=3600, description="Seconds to wait for the agent to become ready.")
    communication_timeout: StrictInt = Field(
        10, ge=2, le=3600, description="Seconds of silence after which the agent takes the link to podtwin for broken.")
    reconnect_grace: StrictInt = Field(
        60, ge=0, le=3600, description="Seconds a session outlives a broken link (the agent keeps it, podtwin "
        "reconnects); 0 ends the session at once, as before.")
    namespace: str | None = Field(
        None, description="Namespace for the agent Job; default: the target's namespace.")
    ephemeral: StrictBool = Field(
        False, description="Run the agent as an ephemeral container in the target pod instead of a Job.")
    transport: Literal["port-forward", "exec"] = Field(
        "port-forward", description="How podtwin reaches the agent through the API server: port-forward, or exec (a relay's stdin/stdout).")
    privileged: StrictBool = Field(
        False, description="Run the agent container privileged (needed on some hardened nodes).")
    labels: StrMap = Field(
        default_factory=dict, description="Extra labels for the agent Job and pod.")
    annotations: StrMap = Field(
        default_factory=dict, description="Extra annotations for the agent Job and pod.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="When Kubernetes pulls the agent image.")
    image_pull_secrets: list[ImagePullSecret] = Field(
        default_factory=list, description="Secrets used to pull the agent image: [{name: ...}].")
    tolerations: list[dict[str, Any]] | None = Field(
        None, description="Tolerations for the agent pod (Kubernetes objects); default: tolerate everything.")
    node_selector: StrMap = Field(
        default_factory=dict, description="Node selector for the agent pod when it is not pinned to the target's node.")
    resources: AgentResources | None = Field(
        None, description="Resource requests/limits for the agent container; default: podtwin's small defaults.")


class ContainerConfig(_Model):
    cli_extra_args: StrList = Field(
        default_factory=list, description="Extra `docker run` flags: -p/--publish for the sidecar (it owns the "
        "app's network namespace: [\"-p\", \"8080:80\"] publishes the app's port 80); -v, -l, --cap-add, "
        "--cap-drop, --device, --security-opt, --tmpfs, --shm-size, -m, --cpus, --read-only, --init for the app.")


TargetField = Annotated[TargetConfig, _shorthand(
    lambda v: {"path": v} if isinstance(v, str) else None, "a target string or {path, namespace}",
    str | TargetConfig)]


class PodtwinConfig(_Model):
    description: str | None = Field(
        None, description="One line saying what this config or profile is for.")
    target: TargetField = Field(
        default_factory=TargetConfig, description="The container or Kubernetes workload to run as: a string or {path, namespace}.")
    kube_context: str | None = Field(
        None, description="kubeconfig context to use; default: the current context.")
    kubeconfig: str | None = Field(
        None, description="kubeconfig file (mirrord's key; `~` expanded); --kubeconfig wins; default: $KUBECONFIG "
        "or ~/.kube/config.")
    feature: FeatureConfig = Field(
        default_factory=FeatureConfig, description="What the local container borrows from the target.")
    agent: AgentConfig = Field(
        default_factory=AgentConfig, description="The helper podtwin runs next to a Kubernetes target.")
    container: ContainerConfig = Field(
        default_factory=ContainerConfig, description="How podtwin runs its local sidecar container.")

    def kubeconfig_path(self) -> str | None:
        return None if self.kubeconfig is None else os.path.expanduser(self.kubeconfig)

    def target_spec(self) -> Target | None:
        """The parsed target, or None when no target is configured."""
        return None if self.target.path is None else parse_target(self.target.path)


def config_schema() -> dict[str, Any]:
    """JSON schema of podtwin config files (for editors and `podtwin config schema`)."""
    schema = PodtwinConfig.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "podtwin configuration"
    schema["properties"]["$schema"] = {
        "type": "string", "description": "JSON schema URL for editors; ignored."}
    return schema
