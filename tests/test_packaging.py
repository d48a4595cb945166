"""The install claims one top-level name, `giftstream`, and ships every subpackage."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_giftstream_imports_from_outside_the_repo_and_generic_names_do_not(
    tmp_path: Path,
) -> None:
    found = _imports(
        "import giftstream.server.app, giftstream.protocol, giftstream.loadtest.cli", tmp_path
    )
    assert found.returncode == 0, found.stderr
    for generic in ("server", "protocol", "loadtest"):
        missing = _imports(f"import {generic}", tmp_path)
        assert missing.returncode != 0
        assert "ModuleNotFoundError" in missing.stderr


def test_every_package_folder_is_listed_for_the_wheel() -> None:
    """setuptools installs only the listed packages: a new subpackage left out of
    pyproject.toml works in an editable install and is missing from a wheel."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = set()
    for name, folder in setuptools["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            relative = init.parent.relative_to(base)
            on_disk.add(".".join((name, *relative.parts)))
    assert listed == on_disk


def test_the_web_pages_are_package_data() -> None:
    """The pages are read from the installed package: a file of server/web/ that no
    package-data pattern names is served by an editable install and missing from a wheel."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["giftstream.server"]
    web = ROOT / "server" / "web"
    files = [path.relative_to(ROOT / "server") for path in web.iterdir() if path.is_file()]
    assert files
    for path in files:
        assert any(path.match(pattern) for pattern in patterns), path


def test_every_served_file_is_in_the_web_folder() -> None:
    from giftstream.server.realtime.pages import PAGES, STATIC_FILES

    web = ROOT / "server" / "web"
    served = {*PAGES.values(), *STATIC_FILES}
    assert served == {path.name for path in web.iterdir() if path.is_file()}
