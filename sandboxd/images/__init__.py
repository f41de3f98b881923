"""Sandbox images: built from Debian packages with mmdebstrap, named by their recipe.

An image is a directory ``<state_dir>/images/<id>/`` holding ``rootfs/`` (the root tree
the namespaces backend mounts read-only) and ``manifest.json`` (recipe, languages and
their versions). ``<id>`` is a hash of the recipe (``guest/recipe.toml``), so a build
that would change nothing finds its image already there and returns at once.

The guest agent is not baked in: each backend puts the agent of the running daemon into
its sandboxes, so daemon and agent can never disagree about the protocol.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sandboxd.errors import ConfigError, LaunchError
from sandboxd.images.vm_artifacts import build_vm_artifacts
from sandboxd.languages import BY_NAME

BUILDER_VERSION = 2  # bump when the build itself changes what an image contains
Progress = Callable[[str], None]


def load_recipe() -> dict[str, Any]:
    text = resources.files("guest").joinpath("recipe.toml").read_text()
    return tomllib.loads(text)


def recipe_id(recipe: dict[str, Any]) -> str:
    canonical = json.dumps({"builder": BUILDER_VERSION, "recipe": recipe}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    id: str
    path: Path
    manifest: dict[str, Any]

    @classmethod
    def at(cls, path: Path) -> Image:
        return cls(path.name, path, json.loads((path / "manifest.json").read_text()))

    @classmethod
    def external(cls, rootfs: Path) -> Image:
        """A root tree given by path (ROOTFS_PATH): its languages are the runtimes found
        in it, their versions unknown."""
        if not rootfs.is_dir():
            raise ConfigError(f"rootfs path {rootfs}: expected a directory holding a root tree")
        found = {
            name: "unknown"
            for name, language in BY_NAME.items()
            if any(
                (rootfs / d / language.version_command[0]).exists()
                for d in ("usr/bin", "usr/local/bin")
            )
        }
        return cls("external", rootfs, {"languages": found, "rootfs": str(rootfs)})

    @property
    def vm_dir(self) -> Path | None:
        """The VM artifacts (bzImage, vmlinux, modules/, busybox, rootfs.ext4), if built."""
        return self.path / "vm" if "vm" in self.manifest else None

    def require_vm_dir(self) -> Path:
        """:attr:`vm_dir`, or LaunchError for an image built without VM artifacts."""
        if self.vm_dir is None:
            raise LaunchError(f"image {self.id} has no VM artifacts: rebuild it")
        return self.vm_dir

    @property
    def rootfs(self) -> Path:
        return Path(self.manifest.get("rootfs") or self.path / "rootfs")

    @property
    def languages(self) -> dict[str, str]:
        """Language name → version of its runtime in this image."""
        return dict(self.manifest.get("languages", {}))

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": str(self.path),
            "created": self.manifest.get("created"),
            "languages": self.languages,
        }


class ImageStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "images"

    def __iter__(self) -> Iterator[Image]:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.iterdir()):
            manifest = path / "manifest.json"
            if path.name.startswith(".") or not manifest.is_file():
                continue
            yield Image.at(path)

    def get(self, image_id: str) -> Image:
        """The image with this id or unique id prefix; ConfigError if there is none."""
        matches = [image for image in self if image.id.startswith(image_id)]
        if len(matches) != 1:
            what = "no image" if not matches else "more than one image"
            raise ConfigError(f"{what} matches {image_id!r} in {self.root}")
        return matches[0]

    def current(self) -> Image:
        """The image of the current recipe; ConfigError saying how to build it if absent."""
        image_id = recipe_id(load_recipe())
        path = self.root / image_id
        if not (path / "manifest.json").is_file():
            raise ConfigError(
                f"no image for the current recipe (id {image_id}) in {self.root}: "
                "build it with `sudo sandboxd image build`"
            )
        return Image.at(path)

    def remove(self, image_id: str) -> Image:
        image = self.get(image_id)
        shutil.rmtree(image.path)
        return image

    def build(self, progress: Progress, *, force: bool = False) -> Image:
        """Build the current recipe's image unless it exists; LaunchError on failure."""
        recipe = load_recipe()
        image_id = recipe_id(recipe)
        final = self.root / image_id
        if (final / "manifest.json").is_file() and not force:
            progress(f"image {image_id} is up to date (recipe unchanged)")
            return self.current()
        self.root.mkdir(parents=True, exist_ok=True)
        for directory in (self.root.parent, self.root):
            directory.chmod(0o755)  # sandboxes run as unprivileged uids and must reach it
        work = self.root / f".build-{image_id}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o755)
        try:
            steps = 4
            progress(f"[1/{steps}] bootstrapping Debian {recipe['suite']} with mmdebstrap")
            _bootstrap(recipe, work / "rootfs", progress)
            progress(f"[2/{steps}] installing runtimes from PyPI wheels")
            _install_wheels(recipe, work / "rootfs", work / "wheels", progress)
            progress(f"[3/{steps}] recording runtime versions")
            versions = {name: _version(work / "rootfs", name) for name in recipe["languages"]}
            for name, version in versions.items():
                progress(f"    {name}: {version}")
            progress(f"[4/{steps}] VM artifacts: kernel, modules, busybox, rootfs.ext4")
            vm = build_vm_artifacts(recipe["vm"], work / "rootfs", work / "vm", progress)
            manifest = {
                "id": image_id,
                "recipe": recipe,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "languages": versions,
                "vm": vm,
            }
            (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            work.rename(final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        progress(f"image {image_id} built in {final}")
        return self.current()


def host_apt_sources(suite: str) -> list[str]:
    """The host's Debian apt sources for ``suite`` (and its -updates/-security), as
    one-line entries; other repositories the host may use are left out."""
    entries: list[tuple[str, str, str]] = []
    apt = Path("/etc/apt")
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for paragraph in re.split(r"\n\s*\n", text):
                fields = dict(
                    (key.strip().lower(), value.strip())
                    for key, _, value in (
                        line.partition(":")
                        for line in paragraph.splitlines()
                        if line and not line.startswith("#") and ":" in line
                    )
                )
                if (
                    "deb" in fields.get("types", "").split()
                    and fields.get("enabled", "yes") != "no"
                ):
                    for uri in fields.get("uris", "").split():
                        for entry_suite in fields.get("suites", "").split():
                            entries.append((uri, entry_suite, fields.get("components", "main")))
        elif path.suffix == ".list" or path.name == "sources.list":
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()  # drop [options]
                if len(words) >= 4 and words[0] == "deb":
                    entries.append((words[1], words[2], " ".join(words[3:])))
    wanted = re.compile(rf"^{re.escape(suite)}([-/](updates|security))?$")
    lines = [f"deb {uri} {s} {components}" for uri, s, components in entries if wanted.match(s)]
    return list(dict.fromkeys(lines))


def _bootstrap(recipe: dict[str, Any], rootfs: Path, progress: Progress) -> None:
    if shutil.which("mmdebstrap") is None:
        raise LaunchError("mmdebstrap is not installed (apt install mmdebstrap)")
    packages = list(
        dict.fromkeys(
            [
                *recipe["packages"],
                *(p for lang in recipe["languages"].values() for p in lang["packages"]),
            ]
        )
    )
    sources = host_apt_sources(recipe["suite"])
    if not sources:
        progress(
            f"    the host has no apt sources for {recipe['suite']}: using mmdebstrap's default"
        )
    argv = [
        "mmdebstrap",
        f"--variant={recipe['variant']}",
        "--mode=root",
        "--include=" + ",".join(packages),
        # Mount points for the jail: the working directory and the agent's directory.
        '--customize-hook=mkdir -p "$1/work" "$1/opt/sandboxd"',
        recipe["suite"],
        str(rootfs),
        *sources,
    ]
    _run_with_progress(argv, progress)


def _install_wheels(
    recipe: dict[str, Any], rootfs: Path, download: Path, progress: Progress
) -> None:
    """Put the binaries that PyPI wheels ship (e.g. Deno's) into /usr/local/bin."""
    wheels = [w for lang in recipe["languages"].values() for w in lang.get("wheels", [])]
    if not wheels:
        progress("    none")
        return
    download.mkdir()
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--progress-bar",
        "off",
        "--dest",
        str(download),
        *wheels,
    ]
    _run_with_progress(argv, progress)
    target = rootfs / "usr/local/bin"
    for wheel in sorted(download.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                parts = member.split("/")
                if len(parts) == 3 and parts[0].endswith(".data") and parts[1] == "scripts":
                    destination = target / parts[2]
                    with archive.open(member) as source, destination.open("wb") as out:
                        shutil.copyfileobj(source, out)
                    destination.chmod(0o755)
                    progress(f"    {wheel.name}: /usr/local/bin/{parts[2]}")
    shutil.rmtree(download)


def _run_with_progress(argv: list[str], progress: Progress) -> None:
    tail: list[str] = []
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout
        for line in proc.stdout:
            line = line.rstrip()
            tail = [*tail[-19:], line]
            progress(f"    {line}")
    if proc.returncode != 0:
        raise LaunchError(
            f"{argv[0]} failed with exit code {proc.returncode}",
            argv=argv,
            exit_code=proc.returncode,
            log_tail="\n".join(tail),
        )


def _version(rootfs: Path, language: str) -> str:
    command = BY_NAME[language].version_command
    chroot = shutil.which("chroot", path="/usr/sbin:/usr/bin:/sbin:/bin") or "chroot"
    done = subprocess.run(
        [chroot, str(rootfs), *command],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
    )
    if done.returncode != 0:
        raise LaunchError(
            f"{language}: {' '.join(command)} failed in the image: {done.stderr.strip()}",
            argv=list(command),
            exit_code=done.returncode,
        )
    # "Python 3.11.2", "rustc 1.85.0 (...)", "deno 2.1.4 (...)": the first version number.
    match = re.search(r"\d+\.\d+(\.\d+)?", done.stdout + done.stderr)
    return match.group(0) if match else (done.stdout.strip() or "unknown")
