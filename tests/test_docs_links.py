"""The project stands on its own: every link in README.md and docs/ resolves (files and
#anchors), every `docs/<page>.md#anchor` pointer in code, configs, scripts and tests
resolves, and nothing cites a document that is not in the repository."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "runs", "data", "__pycache__", "node_modules", ".pytest_cache"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".sbatch", ".toml", ".txt", ".cfg", ".ini", ""}

# Background documents that were never part of the repository; built from parts so
# that this file does not match itself.
OUTSIDE_DOCUMENTS = [
    "cstp-method" + "-spec", "DESIGN" + ".md", "dali" + "-facts", "dali-under" + "-torchrun",
    "reference" + "-readme", "readme" + "-anchors", "shared/" + "docs", "shared/" + "device",
]
SPEC_SECTION = re.compile(r"\bspec(?:\.md)? ?(?:" + "\u00a7" + r"|\d+\.\d)")  # "spec" + a section number

MARKDOWN_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
DOCS_POINTER = re.compile(r"\bdocs/([A-Za-z0-9_-]+\.md)(#[A-Za-z0-9_-]+)?")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
FENCE = re.compile(r"^\s*(```|~~~)")


def repo_files():
    for path in sorted(REPO.rglob("*")):
        rel = path.relative_to(REPO)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name == "Makefile"):
            yield path


def markdown_pages():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, markup and punctuation dropped
    (letters, digits, spaces, '-' and '_' kept), spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)   # link text only
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen, in_fence = set(), {}, False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        found.update(HTML_ANCHOR.findall(line))
        heading = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = github_slug(heading.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links_outside_code(page: Path):
    """(line number, target) of every markdown link outside fenced code and inline code."""
    in_fence = False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for match in MARKDOWN_LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            yield number, match.group(1) or match.group(2)


def check_target(source: Path, target: str) -> str | None:
    """None when `target` (relative to `source`) resolves, else what is wrong."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
        return None
    path_part, _, anchor = target.partition("#")
    dest = (source.parent / path_part).resolve() if path_part else source
    rel = dest.relative_to(REPO).as_posix() if dest.is_relative_to(REPO) else str(dest)
    if not dest.exists():
        return f"{target}: no such file ({rel})"
    if anchor:
        if dest.suffix != ".md":
            return f"{target}: an anchor into a file that is not markdown"
        if anchor not in anchors(dest):
            return f"{target}: {rel} has no heading or anchor '{anchor}'"
    return None


def test_github_slug_rules():
    assert github_slug("Spatial overlap label") == "spatial-overlap-label"
    assert github_slug("Backbone: R(2+1)D-10") == "backbone-r21d-10"
    assert github_slug("`build-lmdb` and `verify`") == "build-lmdb-and-verify"
    assert github_slug("Does it learn?") == "does-it-learn"


def test_anchor_checker_catches_a_missing_anchor_and_file(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    page = tmp_path / "a.md"
    page.write_text("# Title\n\n## Same\n\n## Same\n\n```\n## not a heading\n```\n")
    assert anchors(page) == {"title", "same", "same-1"}
    assert check_target(page, "#same-1") is None
    assert "no heading or anchor" in check_target(page, "#not-a-heading")
    assert "no such file" in check_target(page, "b.md")


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_link_in_the_readme_and_docs_resolves(page):
    problems = [f"{page.relative_to(REPO)}:{n}: {problem}"
                for n, target in links_outside_code(page)
                if (problem := check_target(page, target))]
    assert not problems, "\n".join(problems)


def test_the_readme_links_into_docs():
    targets = {t.partition("#")[0] for _, t in links_outside_code(REPO / "README.md")}
    assert {"docs/method.md", "docs/data.md", "docs/performance.md", "docs/deviations.md",
            "docs/architecture.md", "docs/gpu.md"} <= targets


def test_every_docs_pointer_in_the_code_resolves():
    problems = []
    for path in repo_files():
        if path.suffix == ".md":
            continue   # markdown pages are checked link by link above
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for page, anchor in DOCS_POINTER.findall(line):
                problem = check_target(REPO / "README.md", f"docs/{page}{anchor}")
                if problem:
                    problems.append(f"{path.relative_to(REPO)}:{number}: {problem}")
    assert not problems, "\n".join(problems)


def test_nothing_cites_documents_outside_the_repository():
    hits = []
    for path in repo_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if any(name in line for name in OUTSIDE_DOCUMENTS) or SPEC_SECTION.search(line):
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not hits, "cites documents that are not in the repository (point into docs/):\n" + "\n".join(hits)


def test_the_readme_stays_short():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 150
