"""`netctl lab up|down|status`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from netctl.annotations import POD_MODES
from netctl.lab.k8s import find_k8s_binary
from netctl.lab.lab import DEFAULT_RUN_DIR, Lab, LabState
from netctl.lab.topology import demo


def _print_table(rows: list[dict[str, object]]) -> None:
    names = [str(r["pod"]) for r in rows]
    print(f"{'POD':<14} {'TENANT':<8} {'NODE':<10} {'IP':<12} REACHES (TCP :8080)")
    for r in rows:
        reaches = r.get("reaches")
        if isinstance(reaches, list):
            marks = " ".join(("✓" if n in reaches else "✗") + n for n in names if n != r["pod"])
        else:
            marks = "-"
        print(f"{r['pod']!s:<14} {r['tenant']!s:<8} {r['node']!s:<10} {r['ip']!s:<12} {marks}")


def _describe(lab: Lab) -> None:
    print()
    print(f"lab {lab.prefix} is up in {lab.run_dir}")
    print(f"  kubeconfig:  export KUBECONFIG={lab.kubeconfig}")
    print(f"  kubectl:     kubectl --kubeconfig {lab.kubeconfig} get nodes,pods -A -o wide")
    print(f"  OVN NB:      ovn-nbctl --db={lab.ovn.nb_connection} show")
    print(f"  OVS:         ip netns exec {lab.hv_netns} ovs-vsctl --db={lab.ovs.db_connection} show")
    print(f"  controller:  log {lab.run_dir / 'controller.log'}")
    if lab.topology.public_cidr:
        print(f"  internet:    ip netns exec {lab.internet_netns} ...  (provider network {lab.topology.public_cidr})")
    print(f"  tear down:   netctl lab down --run-dir {lab.run_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netctl lab", description="The local lab (see README).")
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="where the lab keeps its state")
    parser.add_argument("--demo", action="store_true", help="(up) create the demo pods and print reachability")
    parser.add_argument("--pods", action="store_true", help="(status) list pods with a reachability probe")
    parser.add_argument("--public-cidr", default=None,
                        help="(up) provider network for pods annotated netctl.io/public-ip: \"true\" (e.g. "
                        "203.0.113.0/24), with an \"internet\" netns holding its gateway")
    parser.add_argument("--mode", choices=POD_MODES, default="ovs",
                        help="(up) how the tenants' pods attach: ovs (veth on the hypervisor's br-int, default), "
                        "nested-nic (the controller hot-plugs each pod's port into its node VM) or nested-vlan "
                        "(each pod's port is a VLAN subport of its VM's NIC, tagged by the VM's own OVS)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    state = LabState.load(args.run_dir)
    if args.action == "down":
        if state is None and not args.run_dir.exists():
            print(f"no lab in {args.run_dir}")
            return 0
        Lab(demo(), args.run_dir, prefix=state.prefix if state else None).down()
        print(f"lab in {args.run_dir} removed")
        return 0
    if args.action == "status":
        if state is None:
            print(f"no lab in {args.run_dir}")
            return 1
        kubeconfig = args.run_dir / "k8s" / "kubeconfig" / "admin.yaml"
        healthy = state.ready and Lab.is_healthy(args.run_dir)
        print(json.dumps({"prefix": state.prefix, "ready": state.ready, "healthy": healthy,
                          "nodes": state.nodes, "kubeconfig": str(kubeconfig)}, indent=2))
        if args.pods and healthy:
            kubectl = [str(find_k8s_binary("kubectl")), f"--kubeconfig={kubeconfig}"]
            for what in (["get", "tenants"], ["get", "nodes,pods", "-A", "-o", "wide"]):
                subprocess.run([*kubectl, *what], check=False)
        return 0 if healthy else 1

    # up
    if state is not None:
        if state.ready and Lab.is_healthy(args.run_dir):
            print(f"lab {state.prefix} is already up in {args.run_dir} "
                  f"(kubeconfig {args.run_dir / 'k8s' / 'kubeconfig' / 'admin.yaml'}); nothing to do")
            return 0
        print(f"removing an incomplete lab in {args.run_dir} first")
        Lab(demo(), args.run_dir, prefix=state.prefix).down()
    t0 = time.monotonic()
    topology = demo()
    topology = dataclasses.replace(
        topology, public_cidr=args.public_cidr,
        tenants=tuple(dataclasses.replace(t, mode=args.mode) for t in topology.tenants))
    lab = Lab(topology, args.run_dir, progress=lambda m: print(m, flush=True))
    try:
        lab.up()
        if args.demo:
            print("… demo pods", flush=True)
            lab.create_pods()
            lab.wait_pods_running()
            print(f"✓ demo pods running ({time.monotonic() - t0:.0f} s since start)")
            print()
            _print_table(lab.pod_table())
    except BaseException as exc:
        print(f"lab up failed: {exc}\nremoving what was started", file=sys.stderr)
        lab.down()
        return 1
    print()
    print(lab.cp.kubectl("get", "nodes,pods", "-A", "-o", "wide"))
    _describe(lab)
    return 0
