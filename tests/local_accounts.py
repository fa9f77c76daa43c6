"""Other local accounts on the test's machine, for the tests that show what they cannot do.

As root, a test creates unprivileged system accounts (no home, no login shell), runs commands
as them with `setpriv`, and removes them at the end. Their commands run this environment's
packages through the system's Python of the same version (python_for_every_account).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# This interpreter's version, installed by the system where every account can run it.
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")


def missing_account_tools() -> str | None:
    """Why this machine cannot run commands as the test's own accounts; None when it can."""
    if os.geteuid() != 0:
        return "needs root to create local accounts"
    if not shutil.which("setpriv"):
        return "needs setpriv (util-linux) to run commands as the test's accounts"
    if not SYSTEM_PYTHON.is_file():
        return f"needs {SYSTEM_PYTHON}, the system's Python {sys.version_info.major}.{sys.version_info.minor}"
    return None


def run_checked(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


def add_account(name: str, *groups: str) -> None:
    """An unprivileged system account in `groups`, with no home and no login shell."""
    member_of = ["-G", ",".join(groups)] if groups else []
    run_checked("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", *member_of, name)


def remove_accounts(names: list[str]) -> list[str]:
    """Remove the accounts; returns those that could not be (a process of theirs still running)."""
    return [name for name in names if subprocess.run(["userdel", name], capture_output=True).returncode]


def as_account(name: str, command: list[str]) -> list[str]:
    """`command` as the account with its groups, as a login gives them."""
    return ["setpriv", "--reuid", name, "--regid", name, "--init-groups", *command]


@contextmanager
def folder_every_account_reaches(prefix: str) -> Iterator[Path]:
    """A new folder every account may enter (0755), removed at the end. Not tmp_path: pytest makes
    its folders root-only, and the test's accounts need to reach what is in it."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def python_for_every_account(folder: Path) -> Path:
    """This environment's Python as other accounts can run it: the system's interpreter of the same
    version in a venv that adds this environment's packages, with its console scripts (flwr, and the
    Flower processes the SuperLink starts) pointing at it. This interpreter itself may sit in root's
    private home, as pyenv puts it."""
    run_checked(str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(folder))
    python = folder / "bin" / "python"
    its_packages = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    ours = sysconfig.get_paths()["purelib"]
    (Path(its_packages.decode().strip()) / "fedbt-test.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    for script in Path(sys.executable).parent.iterdir():
        lines = script.read_text(errors="replace").splitlines(keepends=True) if script.is_file() else []
        if lines and runs_with_this_environment(lines[0]):
            (folder / "bin" / script.name).write_text(f"#!{python}\n" + "".join(lines[1:]))
            (folder / "bin" / script.name).chmod(0o755)
    return python


def runs_with_this_environment(first_line: str) -> bool:
    """Whether a console script's shebang names this environment's interpreter: pip writes `python`
    or `python3.X`, whichever created the environment."""
    interpreter = Path(first_line.removeprefix("#!").strip())
    return (
        first_line.startswith("#!")
        and interpreter.parent == Path(sys.executable).parent
        and interpreter.name.startswith("python")
    )
