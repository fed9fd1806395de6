"""Container images for the lab, built offline from Debian's ``busybox-static``.

The lab has no registry and must not pull: kubelet 1.20 asks for ``k8s.gcr.io/pause:3.2`` as the
sandbox image and demo pods need a shell, ``httpd`` and ``nc``. Both images are one layer holding
``/bin/busybox`` and a symlink per applet, written as docker-archive tarballs (``manifest.json``,
the image config, the layer) that ``ctr images import`` accepts. The build is deterministic (fixed
mtimes and owners), so the tarball is cached by a hash of its inputs and rebuilt only when the
busybox binary or the image definition changes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
PAUSE_IMAGE = "k8s.gcr.io/pause:3.2"
TOOLS_IMAGE = "netctl.io/lab/busybox:1"
FORMAT_VERSION = "1"  # bump when the layout of the tarball changes
EPOCH = "1970-01-01T00:00:00Z"

# PID 1 ignores signals it has no handler for, so the sandbox needs an explicit trap to stop on
# SIGTERM; ``sleep & wait`` keeps the shell interruptible while it waits.
SLEEP_FOREVER = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 86400 & wait $!; done"]


@dataclass(frozen=True)
class ImageSpec:
    tag: str
    entrypoint: tuple[str, ...] | None
    cmd: tuple[str, ...] | None


PAUSE = ImageSpec(PAUSE_IMAGE, tuple(SLEEP_FOREVER), None)
TOOLS = ImageSpec(TOOLS_IMAGE, None, tuple(SLEEP_FOREVER))


def default_cache_dir() -> Path:
    return Path(os.environ.get("NETCTL_CACHE", Path.home() / ".cache" / "netctl")) / "images"


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout
    return sorted(a for a in out.split() if a and a != "busybox" and "/" not in a)


def _add(tar: tarfile.TarFile, name: str, *, kind: bytes = tarfile.REGTYPE, mode: int = 0o644,
         data: bytes = b"", link: str = "") -> None:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _layer(busybox: Path) -> bytes:
    """The single rootfs layer: busybox, its applets, and the few files a shell expects."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d, mode in (("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("proc", 0o555), ("root", 0o700),
                        ("sys", 0o555), ("tmp", 0o1777), ("var", 0o755), ("var/www", 0o755)):  # fmt: skip
            _add(tar, d, kind=tarfile.DIRTYPE, mode=mode)
        _add(tar, "bin/busybox", mode=0o755, data=busybox.read_bytes())
        for applet in _applets(busybox):
            _add(tar, f"bin/{applet}", kind=tarfile.SYMTYPE, mode=0o777, link="busybox")
        _add(tar, "etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        _add(tar, "etc/group", data=b"root:x:0:\nnogroup:x:65534:\n")
    return buf.getvalue()


def _archive(spec: ImageSpec, layer: bytes) -> bytes:
    layer_id = hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": _arch(),
        "os": "linux",
        "created": EPOCH,
        "config": {
            "Env": ["PATH=/bin"],
            "Entrypoint": list(spec.entrypoint) if spec.entrypoint else None,
            "Cmd": list(spec.cmd) if spec.cmd else None,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_id}"]},
        "history": [{"created": EPOCH, "created_by": "netctl.lab.images from Debian busybox-static"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = f"{hashlib.sha256(config_bytes).hexdigest()}.json"
    manifest = [{"Config": config_name, "RepoTags": [spec.tag], "Layers": [f"{layer_id}/layer.tar"]}]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, layer_id, kind=tarfile.DIRTYPE, mode=0o755)
        _add(tar, f"{layer_id}/layer.tar", data=layer)
        _add(tar, config_name, data=config_bytes)
        _add(tar, "manifest.json", data=json.dumps(manifest).encode())
    return buf.getvalue()


def build_image(spec: ImageSpec, cache_dir: Path | None = None, busybox: Path = BUSYBOX) -> Path:
    """Docker-archive tarball of ``spec`` (cached by content hash); returns its path."""
    if not busybox.exists():
        raise FileNotFoundError(f"{busybox} missing: install Debian's busybox-static")
    cache = cache_dir or default_cache_dir()
    h = hashlib.sha256()
    h.update(FORMAT_VERSION.encode())
    h.update(json.dumps([spec.tag, spec.entrypoint, spec.cmd, _arch()]).encode())
    h.update(busybox.read_bytes())
    path = cache / f"{spec.tag.replace('/', '_').replace(':', '_')}-{h.hexdigest()[:16]}.tar"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_archive(spec, _layer(busybox)))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # atomic: concurrent builders (threads, processes) write identical bytes
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def lab_images(cache_dir: Path | None = None) -> dict[str, Path]:
    """tag -> tarball for every image a lab node imports (sandbox and tools)."""
    return {spec.tag: build_image(spec, cache_dir) for spec in (PAUSE, TOOLS)}
