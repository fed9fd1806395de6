"""kproxy: the per-tenant kube-proxy (nftables). Not implemented yet — see issue 5."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kproxy",
        description="Per-tenant kube-proxy on nftables: programs only its own tenant's Services "
        "into a table it alone owns. NOT IMPLEMENTED YET (tracked in issue 5); this command does nothing.",
    )
    parser.parse_args(argv)
    print("kproxy: not implemented yet (issue 5)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
