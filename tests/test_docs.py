"""The README's claims that code can contradict: exit codes and the layout table."""

import re

from moderator import cli
from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def documented_exit_codes() -> dict[int, str]:
    section = README.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return {int(m.group(1)): m.group(2).strip() for m in re.finditer(r"^\|\s*`?(\d+)`?\s*\|([^\n]*)\|", section, re.M)}


def test_the_exit_code_table_is_the_codes_the_entry_points_return():
    codes = {
        0: None,
        cli.USER_ERROR_EXIT_CODE: None,
        cli.CHECK_FAILED_EXIT_CODE: None,
        cli.BUSY_EXIT_CODE: None,
        cli.INTERRUPTED_EXIT_CODE: None,
        cli.PREEMPTED_EXIT_CODE: None,
    }
    assert set(documented_exit_codes()) == set(codes)


def test_every_exit_code_the_readme_mentions_is_in_the_table():
    mentioned = {int(code) for code in re.findall(r"\bexit(?:s| code|s with code)? (\d+)\b", README)}
    assert mentioned and mentioned <= set(documented_exit_codes()), mentioned - set(documented_exit_codes())


def test_no_entry_point_returns_an_undocumented_exit_code():
    documented = set(documented_exit_codes())
    for path in sorted(
        p
        for package in ("moderator", "data_prep", "train", "export", "eval", "serve", "bench")
        for p in (REPO_ROOT / package).rglob("*.py")
    ):
        for literal in re.findall(
            r"(?:sys\.exit|return)\((\d+)\)|^\s+return (\d+)\s*(?:#.*)?$", path.read_text(), re.M
        ):
            code = int(next(c for c in literal if c))
            assert code in documented or code == 1 and path.parent.name == "bench", f"{path}: exit code {code}"


def test_the_layout_table_lists_every_package():
    packages = sorted(p.parent.name for p in REPO_ROOT.glob("*/__init__.py") if p.parent.name != "tests")
    layout = README.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\|\s*`([a-z_]+)/`", layout, re.M))
    assert set(packages) <= listed, sorted(set(packages) - listed)
