"""`netctl`: the controller, the local lab and a status view, behind one command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

USAGE = """\
netctl <command> [options]

commands:
  controller      run the controller (netctl controller --help for its settings)
  lab up          bring up the local lab: OVS/OVN, a real Kubernetes control plane, tenant nodes
                  (netns VMs with kubelet + containerd) and the controller; --demo adds demo pods
  lab down        remove everything the lab created
  lab status      show what is running and how to reach it
  status          pods, tenants and their ports as the lab's API server sees them
"""


def _lab(argv: Sequence[str]) -> int:
    from netctl.lab import cli as lab_cli

    return lab_cli.main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    cmd, rest = args[0], args[1:]
    if cmd == "controller":
        from netctl.controller.main import main as controller_main

        return controller_main(rest)
    if cmd == "lab":
        return _lab(rest)
    if cmd == "status":
        return _lab(["status", "--pods", *rest])
    parser = argparse.ArgumentParser(prog="netctl", usage=USAGE)
    parser.error(f"unknown command {cmd!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
