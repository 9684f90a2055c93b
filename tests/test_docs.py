"""The documents say what the code does: every option, metric and module is where a reader
looks for it, with the same name and default (issue #12 item 6)."""

from __future__ import annotations

import re
from pathlib import Path

from anonticket.config import SETTINGS
from anonticket.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text("utf-8")
METRICS_DOC = (REPO / "docs" / "metrics.md").read_text("utf-8")


def table_rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| ---")
    ]


def test_every_option_is_in_the_readme_table_with_its_variable_and_default():
    rows = {row[0]: row for row in table_rows(README) if row[0].startswith("`--")}
    for setting in SETTINGS:
        row = rows.get(f"`--{setting.name}`")
        assert row is not None, f"--{setting.name} is missing from the README's table"
        assert row[1].startswith(f"`{setting.env}`"), (setting.name, row[1])
        shown = "off" if setting.flag else setting.shown_default or setting.default
        assert row[2].replace("`", "").startswith(str(shown)), (setting.name, row[2], shown)
    documented = {name.strip("`")[2:] for name in rows}
    assert documented == {s.name for s in SETTINGS}, "the table lists an option the code lacks"


def exported_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        names.add(family.name + suffix)
    return names


def test_every_metric_is_in_docs_metrics_and_nothing_else_is():
    documented = {
        row[0].strip("`")
        for row in table_rows(METRICS_DOC)
        if row[0].startswith(("`anonticket_", "`process_"))
    }
    exported = exported_names()
    assert not exported - documented, f"not in docs/metrics.md: {exported - documented}"
    assert not documented - exported, f"documented, not exported: {documented - exported}"


def test_every_module_is_in_the_readmes_layout_table():
    layout = "\n".join(
        row[0] + " " + row[1] for row in table_rows(README) if "anonticket" in row[0]
    )
    for path in sorted((REPO / "anonticket").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        relative = path.relative_to(REPO).as_posix()
        package = path.parent.relative_to(REPO).as_posix() + "/"
        named = relative in layout or (
            f"`{package}`" in layout and re.search(rf"\b{re.escape(path.name)}\b", layout)
        )
        top_level_sibling = package == "anonticket/" and re.search(
            rf"`{re.escape(path.name)}`", layout
        )
        assert named or top_level_sibling, f"{relative} is not in the README's layout table"


def test_the_changelog_names_the_running_version_first():
    from anonticket import __version__

    text = (REPO / "CHANGELOG.md").read_text()
    first = re.search(r"^## (\S+) ", text, re.MULTILINE)
    assert first is not None and first.group(1) == __version__
    # The schema a release names is the one its migrations reach.
    schema = re.search(rf"^## {re.escape(__version__)} .*\(schema (\d+)\)", text, re.MULTILINE)
    migrations = sorted((REPO / "anonticket" / "store" / "migrations" / "sqlite").glob("*.sql"))
    assert schema is not None and int(schema.group(1)) == int(migrations[-1].name[:4])
