"""The install step (tools/ovs_c_json.py) must leave the venv's `ovs` on the C JSON parser whenever
the machine has one for this interpreter: OVSDB parsing in pure Python costs most of an OVN port
write (bench/ovn_ports.py), so losing it silently would be a performance regression."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import ovs.json
import pytest

SYSTEM_EXT = Path("/usr/lib/python3/dist-packages/ovs") / f"_json{sysconfig.get_config_var('EXT_SUFFIX')}"


@pytest.mark.skipif(not SYSTEM_EXT.exists(), reason=f"no system C parser at {SYSTEM_EXT} (python3-openvswitch)")
def test_ovs_uses_the_c_json_parser() -> None:
    assert ovs.json.PARSER == ovs.json.PARSER_C, "run `.venv/bin/python tools/ovs_c_json.py` (make does)"


def test_parser_round_trip() -> None:
    doc = {"a": [1, 2.5, "x", {"b": None}], "c": True, "uuid": ["uuid", "0e1e0e1e-0000-4000-8000-000000000001"]}
    assert ovs.json.from_string(ovs.json.to_string(doc)) == doc
