"""``kproxy``: the per-tenant kube-proxy on nftables (settings: ``kproxy.config.KproxyConfig``)."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

from kproxy.config import KproxyConfig
from netctl.config import ConfigError, load


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load(KproxyConfig, argv, prog="kproxy")
    except ConfigError as e:
        print(f"kproxy: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kproxy.app import KproxyApp  # after argument checking: --help stays cheap

    app = KproxyApp(cfg)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger("kproxy").info("signal %d: stopping", signum)
        app.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return app.run()


if __name__ == "__main__":
    sys.exit(main())
