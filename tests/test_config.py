"""Typed configuration: defaults < file < environment < flags, with help from field metadata."""

from __future__ import annotations

import dataclasses
import json

import pytest

from netctl.config import CommonConfig, ConfigError, help_text, load


@dataclasses.dataclass
class ProgramConfig(CommonConfig):
    """A program's own settings on top of the common ones."""

    tenant: str | None = dataclasses.field(default=None, metadata={"help": "only this tenant's objects"})
    service_cidrs: list[str] = dataclasses.field(
        default_factory=lambda: ["10.96.0.0/12"], metadata={"help": "service CIDRs, comma separated"}
    )


def test_defaults():
    cfg = load(CommonConfig, [], env={})
    assert cfg == CommonConfig()
    assert cfg.metrics_address == "127.0.0.1"  # never all addresses by default
    assert (cfg.kubeconfig, cfg.workers, cfg.resync_period_s, cfg.leader_elect) == (None, 4, 300.0, True)
    assert (cfg.log_level, cfg.lease_namespace) == ("INFO", "kube-system")


def test_file_then_env_then_flags(tmp_path):
    path = tmp_path / "netctl.yaml"
    path.write_text("workers: 8\nmetrics_port: 9200\nlog-level: debug\nleader_elect: false\n")
    env = {"NETCTL_METRICS_PORT": "9300", "NETCTL_RESYNC_PERIOD_S": "60", "NETCTL_WORKERS": "16"}
    cfg = load(CommonConfig, ["--config", str(path), "--workers", "2"], env=env)
    assert cfg.workers == 2  # flag beats env beats file
    assert cfg.metrics_port == 9300  # env beats file
    assert cfg.resync_period_s == 60.0
    assert cfg.log_level == "DEBUG"  # from the file, normalised
    assert cfg.leader_elect is False


def test_config_file_from_env_and_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"kubeconfig": "/etc/k.conf", "service_cidrs": ["10.0.0.0/16", "fd00::/108"]}))
    cfg = load(ProgramConfig, [], env={"NETCTL_CONFIG": str(path)})
    assert cfg.kubeconfig == "/etc/k.conf"
    assert cfg.service_cidrs == ["10.0.0.0/16", "fd00::/108"]


def test_booleans_lists_and_optionals_from_strings():
    env = {"NETCTL_LEADER_ELECT": "no", "NETCTL_SERVICE_CIDRS": "10.0.0.0/16, 10.1.0.0/16"}
    cfg = load(ProgramConfig, ["--tenant", "alpha"], env=env)
    assert cfg.leader_elect is False
    assert cfg.service_cidrs == ["10.0.0.0/16", "10.1.0.0/16"]
    assert cfg.tenant == "alpha"
    assert load(ProgramConfig, ["--leader-elect"], env=env).leader_elect is True
    assert load(ProgramConfig, ["--no-leader-elect"], env={}).leader_elect is False


def test_bad_values_name_the_setting_and_source(tmp_path):
    with pytest.raises(ConfigError, match="NETCTL_WORKERS"):
        load(CommonConfig, [], env={"NETCTL_WORKERS": "many"})
    with pytest.raises(ConfigError, match="leader_elect"):
        load(CommonConfig, [], env={"NETCTL_LEADER_ELECT": "maybe"})
    with pytest.raises(ConfigError, match="workers"):
        load(CommonConfig, ["--workers", "0"], env={})
    with pytest.raises(ConfigError, match="metrics_port"):
        load(CommonConfig, ["--metrics-port", "70000"], env={})
    with pytest.raises(ConfigError, match="log_level"):
        load(CommonConfig, ["--log-level", "chatty"], env={})
    path = tmp_path / "c.yaml"
    path.write_text("wrokers: 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'wrokers'"):
        load(CommonConfig, ["--config", str(path)], env={})
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load(CommonConfig, ["--config", str(path)], env={})
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load(CommonConfig, ["--config", str(tmp_path / "missing.yaml")], env={})


def test_help_lists_every_field_with_its_help_default_and_env():
    text = help_text(ProgramConfig, prog="kproxy")
    assert text.startswith("usage: kproxy")
    for f in dataclasses.fields(ProgramConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert "NETCTL_" + f.name.upper() in text.replace("\n", " ").replace(" ", ""), f.name
    assert "only this tenant's objects" in text
    assert "--no-leader-elect" in text


def test_help_flag_exits(capsys):
    with pytest.raises(SystemExit) as exc:
        load(CommonConfig, ["--help"], env={})
    assert exc.value.code == 0
    assert "--metrics-address" in capsys.readouterr().out
