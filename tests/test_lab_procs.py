"""The lab's Daemon must recognise (and so be able to stop) a script started through its shebang."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from netctl.lab.procs import Daemon


def test_stop_terminates_a_shebang_script(tmp_path: Path) -> None:
    script = tmp_path / "sleeper"
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    script.chmod(0o755)
    d = Daemon("sleeper", [script, "--flag"], tmp_path / "log", tmp_path / "pid")
    d.start()
    deadline = time.monotonic() + 10
    while d.pid is None and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = d.pid
    assert pid is not None, "a just-started shebang script must count as running"
    d.stop(timeout=5)
    assert d.pid is None
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]


def test_teardown_kills_what_names_the_lab_but_not_its_caller(tmp_path: Path) -> None:
    """A daemon whose pidfile is gone is still found by its command line; the process running
    the teardown (which may name the run dir itself) is spared."""
    import subprocess

    from netctl.lab.teardown import kill_referencing

    run_dir = tmp_path / "lab-run"
    run_dir.mkdir()
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--dir={run_dir}"])
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kill_referencing(run_dir, timeout=5)
        assert orphan.wait(timeout=10) is not None
        assert unrelated.poll() is None, "a process that does not name the lab was killed"
    finally:
        for p in (orphan, unrelated):
            p.kill()
            p.wait()
