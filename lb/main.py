"""netctl-lb: the LVS + HAProxy load-balancer manager. Not implemented yet."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="netctl-lb",
        description="Load-balancer manager for Services of type LoadBalancer (IPVS front end, per-tenant "
        "HAProxy pools). NOT IMPLEMENTED YET (a later issue); this command does nothing.",
    )
    parser.parse_args(argv)
    print("netctl-lb: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
