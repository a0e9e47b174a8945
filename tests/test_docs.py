"""The documentation stays navigable and true to the code.

- every relative link of README.md and docs/*.md points at a file that exists, and every
  ``#anchor`` into a page names a heading of it (as both MkDocs and GitHub spell the slug);
  MkDocs checks the links between docs pages, but not README.md, which is not in the site;
- ``mkdocs build --strict`` passes, and fails on a copy with a broken link, a link to a
  missing heading, or a page left out of the nav (so the check that CI runs can fail);
- the commands the pages show use options that exist (``fedsqueeze ...`` against the typer
  app, ``python -m benchmarks.NAME ...`` against its ``--help``);
- the run-config table is the one ``server.config.KEYS`` gives.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import markdown
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = REPO_ROOT / "docs"
README = REPO_ROOT / "README.md"

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def strip_code(text: str) -> str:
    """The text without fenced code blocks and inline code (links there are not links)."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def relative_links(text: str) -> list[str]:
    """Targets of the inline links and images that stay inside the repository."""
    targets = []
    for target in _LINK.findall(strip_code(text)):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue  # http:, https:, mailto: ...
        targets.append(target)
    return targets


def mkdocs_anchors(text: str) -> set[str]:
    """Heading ids as MkDocs makes them (Python-Markdown's toc extension)."""
    md = markdown.Markdown(extensions=["toc", "tables", "fenced_code"])
    md.convert(text)
    ids: set[str] = set()

    def walk(tokens: list[dict]) -> None:
        for token in tokens:
            ids.add(token["id"])
            walk(token["children"])

    walk(md.toc_tokens)
    return ids


def github_slug(heading: str) -> str:
    """GitHub's heading anchor (github-slugger): the text, lower case, punctuation
    dropped, every space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = text.replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return text.replace(" ", "-")


def github_anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    ids = set()
    for _, heading in _HEADING.findall(_FENCE.sub("", text)):
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def broken_links(path: Path) -> list[str]:
    """What is wrong with the relative links of one Markdown file (empty: nothing)."""
    text = path.read_text(encoding="utf-8")
    problems = []
    for target in relative_links(text):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.name}: {target}: no file {dest}")
            continue
        if anchor and dest.suffix == ".md":
            page = dest.read_text(encoding="utf-8")
            for spelling, anchors in (
                ("MkDocs", mkdocs_anchors(page)),
                ("GitHub", github_anchors(page)),
            ):
                if anchor not in anchors:
                    problems.append(f"{path.name}: {target}: no heading #{anchor} ({spelling})")
    return problems


@pytest.mark.parametrize("path", [README, *pages()], ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Run-config keys\n\nText.\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/page.md) [ok](docs/page.md#run-config-keys) [web](https://example.org/x.md)\n"
        "`[code](nowhere.md)` [gone](docs/gone.md) [bad](docs/page.md#no-such-heading)\n"
    )
    problems = broken_links(readme)
    assert len(problems) == 3, problems  # the missing file, the anchor as MkDocs and GitHub
    assert "docs/gone.md" in problems[0]
    assert all("#no-such-heading" in p for p in problems[1:])


def test_slugs_agree_with_mkdocs_and_github() -> None:
    text = (
        "## Error feedback (EF), as implemented\n\n## `fedsqueeze simulate`\n\n## Who counts: N\n"
    )
    assert mkdocs_anchors(text) == {
        "error-feedback-ef-as-implemented",
        "fedsqueeze-simulate",
        "who-counts-n",
    }
    assert github_anchors(text) == mkdocs_anchors(text)
    # a repeated heading: GitHub says tests-1, MkDocs tests_1, so no link can reach it on both
    repeated = "## Tests\n\n## Tests\n"
    assert github_anchors(repeated) == {"tests", "tests-1"}
    assert mkdocs_anchors(repeated) == {"tests", "tests_1"}


def test_readme_links_every_page_and_the_nav_lists_them() -> None:
    readme_targets = {t.partition("#")[0] for t in relative_links(README.read_text())}
    nav = (REPO_ROOT / "mkdocs.yml").read_text()
    for page in pages():
        assert f"docs/{page.name}" in readme_targets, f"README.md does not link docs/{page.name}"
        assert re.search(rf":\s*{re.escape(page.name)}\s*$", nav, re.M), f"{page.name} not in nav"


# ----------------------------------------------------------------------------- mkdocs build


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mkdocs", "build", "--strict"]
    command += ["--config-file", str(config), "--site-dir", str(site)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def test_mkdocs_strict_build_passes(tmp_path: Path) -> None:
    result = mkdocs_build(REPO_ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr
    for page in pages():
        built = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert (tmp_path / "site" / built).is_file(), built


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("link", "missing-page.md"),
        ("anchor", "no-such-heading"),
        ("orphan", "orphan.md"),
    ],
)
def test_mkdocs_strict_build_fails_on_a_broken_copy(
    tmp_path: Path, breakage: str, expected: str
) -> None:
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(REPO_ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    index = tmp_path / "docs" / "index.md"
    if breakage == "link":
        index.write_text(index.read_text() + "\nSee [the missing page](missing-page.md).\n")
    elif breakage == "anchor":
        index.write_text(index.read_text() + "\nSee [nothing](algorithms.md#no-such-heading).\n")
    else:
        (tmp_path / "docs" / "orphan.md").write_text("# A page the nav does not list\n")
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0, result.stderr
    assert expected in result.stderr


# ------------------------------------------------------------------- commands true to the code


@dataclass
class Command:
    source: str
    words: list[str]


def shell_commands() -> list[Command]:
    """Every `fedsqueeze ...` and `python -m benchmarks...` line of the bash blocks."""
    commands = []
    for path in [README, *pages()]:
        for block in re.findall(r"^```(?:bash|sh)\n(.*?)^```", path.read_text(), re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                pattern = r"(?:^|\$\(|&& )((?:fedsqueeze|python -m benchmarks\.\w+)(?: [^)]*)?)"
                for m in re.finditer(pattern, line):
                    words = shlex.split(m.group(1).replace("[", " ").replace("]", " "))
                    commands.append(Command(f"{path.name}: {line}", words))
    return commands


def test_docs_show_fedsqueeze_and_benchmark_commands() -> None:
    words = [c.words[0] for c in shell_commands()]
    assert words.count("fedsqueeze") >= 30 and words.count("python") >= 12


def fedsqueeze_option_problems(commands: list[Command]) -> list[str]:
    """Subcommands and options of `fedsqueeze` lines that the typer app does not have."""
    import click
    import typer.main

    from server.cli import app

    root = typer.main.get_command(app)
    problems = []
    for command in commands:
        node: click.Command = root
        words = command.words[1:]
        while isinstance(node, click.Group) and words and words[0] in node.commands:
            node = node.commands[words.pop(0)]
        if isinstance(node, click.Group):
            problems.append(f"{command.source}: no such command {words[:1]}")
            continue
        options = {opt for param in node.params for opt in (*param.opts, *param.secondary_opts)}
        for word in words:
            if word.startswith("-") and word.split("=", 1)[0] not in options:
                problems.append(f"{command.source}: {node.name} has no option {word}")
    return problems


def benchmark_option_problems(commands: list[Command]) -> list[str]:
    """Options of `python -m benchmarks.NAME` lines that the module's --help does not list."""
    by_module: dict[str, list[Command]] = {}
    for command in commands:
        by_module.setdefault(command.words[2], []).append(command)
    problems = []
    for module, module_commands in sorted(by_module.items()):
        help_command = [sys.executable, "-m", module, "--help"]
        result = subprocess.run(
            help_command, capture_output=True, text=True, timeout=300, check=False, cwd=REPO_ROOT
        )
        assert result.returncode == 0, result.stderr
        options = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", result.stdout))
        for command in module_commands:
            for word in command.words[3:]:
                if word.startswith("-") and word not in options:
                    problems.append(f"{command.source}: {module} has no option {word}")
    return problems


def test_fedsqueeze_commands_use_existing_options() -> None:
    shown = [c for c in shell_commands() if c.words[0] == "fedsqueeze"]
    assert fedsqueeze_option_problems(shown) == []
    made_up = [
        Command("made up", ["fedsqueeze", "simulate", "--strategy", "artemis", "--no-such-flag"]),
        Command("made up", ["fedsqueeze", "db", "no-such-command"]),
    ]
    assert fedsqueeze_option_problems(made_up) == [
        "made up: simulate has no option --no-such-flag",
        "made up: no such command ['no-such-command']",
    ]


@pytest.mark.slow
def test_benchmark_commands_use_existing_options() -> None:
    shown = [c for c in shell_commands() if c.words[0] == "python"]
    made_up = Command("made up", ["python", "-m", "benchmarks.faults", "--quick", "--no-such-flag"])
    assert benchmark_option_problems([*shown, made_up]) == [
        "made up: benchmarks.faults has no option --no-such-flag"
    ]


# ---------------------------------------------------------------------- run-config table


def test_run_config_table_is_the_one_server_config_gives() -> None:
    from core.runconfig import KEYS

    def default(value: object) -> str:
        return json.dumps(value) if isinstance(value, str) else repr(value)

    expected = ["| key | default | meaning |", "|---|---|---|"] + [
        f"| `{key}` | `{default(value)}` | {meaning} |" for key, (value, meaning) in KEYS.items()
    ]
    text = (DOCS / "running-simulations.md").read_text()
    section = text.split("## Run-config keys", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert table == expected
