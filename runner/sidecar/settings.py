"""What the sidecar is told: one model, built once by the runner from the config, written to the
session directory as JSON and validated again by the sidecar when it starts.

Only the user's settings cross the process boundary; what follows from them (the kernel rules,
the filters' decisions) is derived on the sidecar's side from the same models.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from podtwin.runner.config.models import DnsConfig, OutgoingConfig, PodtwinConfig
from podtwin.runner.errors import ConfigError
from podtwin.runner.sidecar.fs_plan import plan_files
from podtwin.runner.sidecar.outgoing.policy import DnsFilter, KernelRules, OutgoingFilter
from podtwin.runner.sidecar.outgoing.iptables import RuleSettings


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class IncomingSettings(_Frozen):
    """Which of the app's listening ports take the target's incoming traffic, and how."""

    mode: Literal["steal", "mirror"] = "steal"
    ports: tuple[int, ...] | None = Field(None, description="only these target ports, if given")
    ignore_ports: tuple[int, ...] = ()
    port_mapping: dict[int, int] = Field(default_factory=dict, description="app port -> target port")
    http_filter: dict | None = Field(None, description="the agent's wire form of the HTTP filter")

    @classmethod
    def from_config(cls, cfg: PodtwinConfig) -> "IncomingSettings | None":
        inc = cfg.feature.network.incoming
        if inc.mode == "off":
            return None
        http_filter = None
        if inc.http_filter is not None:
            if inc.mode != "steal":
                raise ConfigError("feature.network.incoming.http_filter works with mode steal only",
                                  "set feature.network.incoming.mode to steal, or remove the filter")
            http_filter = inc.http_filter.model_dump(mode="json", exclude_none=True)
        return cls(mode=inc.mode, ports=tuple(inc.ports) if inc.ports else None,
                   ignore_ports=tuple(inc.ignore_ports), port_mapping=dict(inc.port_mapping),
                   http_filter=http_filter)

    def wanted(self, app_ports: set[int]) -> dict[int, int]:
        """app port -> target port, for the app's listening ports this session takes."""
        out = {}
        for local in app_ports:
            remote = self.port_mapping.get(local, local)
            if remote in self.ignore_ports or (self.ports is not None and remote not in self.ports):
                continue
            out[local] = remote
        return out


class FileExport(_Frozen):
    path: str = Field(description="the path in the app")
    write: bool = Field(False, description="its paths are writable by default (feature.fs.mode write)")
    writable: bool = Field(False, description="any of its paths may be written")
    source: str | None = Field(None, description="the path in the target, when mapped (feature.fs.mapping)")


class FilesSettings(_Frozen):
    """The target's files the sidecar mounts (one sshfs over an sftp channel of the link) under
    ``mount`` (the session volume), for the app to bind at their real paths; and mirrord's
    per-file lists, which the agent applies."""

    exports: tuple[FileExport, ...]
    mount: str
    not_found: tuple[str, ...] = ()
    read_write: tuple[str, ...] = ()
    read_only: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: PodtwinConfig, target_mounts: tuple[tuple[str, bool], ...],
                    mount: str) -> "tuple[FilesSettings | None, list[str]]":
        """What to mount (``fs_plan.plan_files``: feature.fs applied to the target's volume
        mounts), and the notices to print where podtwin applies a key at a coarser grain."""
        fs = cfg.feature.fs
        plan = plan_files(fs, target_mounts)
        if not plan.exports:
            return None, plan.notices
        exports = tuple(FileExport(path=e.path, write=e.write, writable=e.writable, source=e.source)
                        for e in plan.exports)
        return cls(exports=exports, mount=mount, not_found=tuple(fs.not_found), read_write=tuple(fs.read_write),
                   read_only=tuple(fs.read_only)), plan.notices

    def root(self, mount: str | None = None) -> str:
        """Where the one sshfs mount of the exports' tree sits (an export P is at root + P); with
        ``mount``, the same place seen through another path of the session volume (the daemon's)."""
        return f"{mount or self.mount}/root"


class SidecarSettings(_Frozen):
    outgoing: OutgoingConfig = Field(default_factory=OutgoingConfig)
    dns: DnsConfig = Field(default_factory=DnsConfig)
    incoming: IncomingSettings | None = None
    files: FilesSettings | None = None
    connect_timeout: float = Field(60.0, description="how long to wait for the agent's socket")
    reconnect_grace: float = Field(60.0, description="how long to reconnect a broken link before giving up")
    local_names: tuple[str, ...] = Field((), description=(
        "names that resolve locally whatever the DNS filter says (a compose project's services); under the "
        "target's search domains they are not found, so the resolver moves on to the bare name"))
    local_subnets: bool = Field(False, description=(
        "connections to the subnets of the sidecar's own networks (a compose project's) stay local"))

    @classmethod
    def from_config(cls, cfg: PodtwinConfig) -> "SidecarSettings":
        net = cfg.feature.network
        return cls(outgoing=net.outgoing, dns=net.dns, incoming=IncomingSettings.from_config(cfg),
                   connect_timeout=float(cfg.agent.startup_timeout), reconnect_grace=float(cfg.agent.reconnect_grace))

    # -- both ends ---------------------------------------------------------------------------
    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json())

    @classmethod
    def read(cls, path: Path) -> "SidecarSettings":
        return cls.model_validate_json(path.read_text())

    # -- derived on the sidecar's side --------------------------------------------------------
    def outgoing_filter(self) -> OutgoingFilter:
        return OutgoingFilter.from_config(self.outgoing)

    def dns_filter(self) -> DnsFilter:
        return DnsFilter.from_config(self.dns)

    def rules(self, kernel: KernelRules) -> RuleSettings:
        """The iptables rules: what the kernel can decide up front (by address, port, protocol),
        from the outgoing filter's ``kernel_rules()``."""
        return RuleSettings(
            tcp=self.outgoing.tcp, udp=self.outgoing.udp,
            local_cidrs=tuple(tuple(r) for r in kernel.keep_local),
            remote_cidrs=None if kernel.redirect_only is None else tuple(tuple(r) for r in kernel.redirect_only))
