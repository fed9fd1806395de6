"""Give the virtualenv's `ovs` package the C JSON parser Debian ships.

PyPI's `ovs` is pure Python unless built against libopenvswitch, which Debian does not package
for development; without `ovs._json` every OVSDB update is parsed in Python — the largest cost of
OVN port writes and of every OVSDB client start (DESIGN §5). Debian's python3-openvswitch carries
the extension (self-contained, libopenvswitch linked in) for the system CPython ABI. When the
venv's interpreter has the same extension suffix, link it into the venv's package, then prove it
parses; if anything is off, remove the link and keep the pure-Python parser (never fatal).

Usage: .venv/bin/python tools/ovs_c_json.py   (the Makefile runs it after installing the venv)
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

SYSTEM_OVS = Path("/usr/lib/python3/dist-packages/ovs")
PROBE = ("import ovs.json as j; assert j.PARSER == j.PARSER_C, j.PARSER; "
         "v = j.from_string('{\"a\": [1, 2.5, \"x\", {\"b\": null}], \"c\": true}'); "
         "assert v == {'a': [1, 2.5, 'x', {'b': None}], 'c': True}, v")


def probe() -> bool:
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, check=False).returncode == 0


def main() -> int:
    import ovs

    pkg = Path(ovs.__file__).parent
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    if probe():
        print("ovs C JSON parser: already in use")
        return 0
    source = SYSTEM_OVS / f"_json{suffix}"
    if not source.exists():
        print(f"ovs C JSON parser: not available ({source} missing; install python3-openvswitch) — pure Python")
        return 0
    target = pkg / source.name
    target.unlink(missing_ok=True)
    target.symlink_to(source)
    if probe():
        print(f"ovs C JSON parser: linked {target} -> {source}")
        return 0
    target.unlink(missing_ok=True)
    print(f"ovs C JSON parser: {source} does not work with this interpreter — pure Python")
    return 0


if __name__ == "__main__":
    sys.exit(main())
