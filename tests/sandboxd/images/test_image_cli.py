"""`sandboxd image build|list|rm` on the real image store (the Makefile built the image)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from sandboxd.cli import main
from sandboxd.images import load_recipe, recipe_id
from tests.conftest import needs_root

pytestmark = needs_root


def test_build_without_changes_reuses_the_cached_image():
    result = CliRunner().invoke(main, ["image", "build"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == recipe_id(load_recipe())
    assert "is up to date (recipe unchanged)" in result.stderr


def test_list_shows_the_current_image_and_its_languages():
    result = CliRunner().invoke(main, ["image", "list", "--json"])
    images = {image["id"]: image for image in json.loads(result.stdout)}
    current = images[recipe_id(load_recipe())]
    assert set(current["languages"]) == {"python", "typescript", "rust"}


def test_removing_an_unknown_image_is_one_line():
    result = CliRunner().invoke(main, ["image", "rm", "no-such-image"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: no image matches 'no-such-image'")


def test_a_bad_config_stops_with_one_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[pool]\nsize = 'two'\n")
    result = CliRunner().invoke(main, ["run", "--config", str(config)])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {config}: pool.size: expected an integer, got 'two'\n"


def test_a_daemon_without_its_image_says_how_to_build_it(tmp_path):
    config = tmp_path / "empty-state.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}"\nrun_dir = "{tmp_path}/run"\n'
        f'socket = "{tmp_path}/s.sock"\nname = "sbxnoimage"\n'
    )
    result = CliRunner().invoke(main, ["run", "--config", str(config)])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: no image for the current recipe")
    assert "sudo sandboxd image build" in result.stderr
    assert not (tmp_path / "s.sock").exists()


def test_the_daemon_and_the_image_build_say_they_need_root(tmp_path):
    # In a child that has become nobody: one line each, no traceback.
    import os

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            answers = [CliRunner().invoke(main, args) for args in (["run"], ["image", "build"])]
            os.write(write_end, json.dumps([[a.exit_code, a.stderr] for a in answers]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        answers = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert answers == [
        [1, "Error: sandboxd run needs root: it makes jails, cgroups and VMs (use sudo)\n"],
        [
            1,
            "Error: sandboxd image build needs root: mmdebstrap builds the root tree as root "
            "(use sudo)\n",
        ],
    ]
