"""The languages sandboxd can run and how: source file, compile and run commands.

This is the only place that knows how a language is run; the agent just runs the
commands it is given. Which languages a daemon offers is decided by its image: the
image's manifest lists the runtimes it was built with and their versions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from sandboxd.errors import UnsupportedLanguage

WORKDIR = "/work"


@dataclass(frozen=True)
class Language:
    name: str
    aliases: tuple[str, ...]
    extension: str
    source_file: str
    run: tuple[str, ...]
    compile: tuple[str, ...] | None = None
    version_command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Whether a ready sandbox may start ``run`` before its job comes (the agent's
    # WarmRuntime): only where the runtime reads its source file once, as a stream.
    warm: bool = False
    # Whether a session can run its code as cells of one interpreter kept alive between
    # them (the agent's kernel: guest/agent/kernel.py).
    cells: bool = False

    @property
    def compiled(self) -> bool:
        return self.compile is not None

    def describe(self, version: str) -> dict[str, object]:
        return {
            "name": self.name,
            "version": version,
            "extension": self.extension,
            "compiled": self.compiled,
            "aliases": list(self.aliases),
        }


LANGUAGES: tuple[Language, ...] = (
    Language(
        name="python",
        aliases=("py", "python3"),
        extension=".py",
        source_file="main.py",
        run=("python3", "main.py"),
        version_command=("python3", "--version"),
        warm=True,
        cells=True,
        # Unbuffered, so output streams to the caller as the program writes it.
        env=MappingProxyType({"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}),
    ),
    Language(
        name="typescript",
        aliases=("ts", "deno"),
        extension=".ts",
        source_file="main.ts",
        # Only the working directory is readable and writable; no network, env or prompt.
        run=(
            "deno",
            "run",
            "--quiet",
            "--no-prompt",
            "--no-config",
            "--no-lock",
            f"--allow-read={WORKDIR}",
            f"--allow-write={WORKDIR}",
            "main.ts",
        ),
        version_command=("deno", "--version"),
        warm=True,
        env=MappingProxyType(
            {"DENO_DIR": "/tmp/deno", "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"}
        ),
    ),
    Language(
        name="rust",
        aliases=("rs",),
        extension=".rs",
        source_file="main.rs",
        compile=("rustc", "--edition=2021", "-O", "-o", "main", "main.rs"),
        run=("./main",),
        version_command=("rustc", "--version"),
    ),
)
BY_NAME: dict[str, Language] = {language.name: language for language in LANGUAGES}
_BY_KEY = {key: language for language in LANGUAGES for key in (language.name, *language.aliases)}


def named(name: str) -> Language | None:
    """The language ``name`` (or an alias of it) names, whatever its case and the spaces
    around it; None if it names none."""
    return _BY_KEY.get(name.strip().lower())


class LanguageTable:
    """The languages one image offers, with their versions, looked up by name or alias."""

    def __init__(self, versions: Mapping[str, str]) -> None:
        self.versions = dict(versions)
        self._offered = [BY_NAME[name] for name in BY_NAME if name in versions]

    def names(self) -> list[str]:
        return [language.name for language in self._offered]

    def resolve(self, name: str) -> Language:
        """The language for ``name`` or an alias; UnsupportedLanguage if none."""
        language = named(name)
        if language is None or language.name not in self.versions:
            known = self.names()
            raise UnsupportedLanguage(
                f"Unsupported language: {name} (known: {', '.join(known)})",
                language=name,
                known=known,
            )
        return language

    def describe(self) -> list[dict[str, object]]:
        return [language.describe(self.versions[language.name]) for language in self._offered]
