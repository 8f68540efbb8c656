"""The documentation holds together: README.md and every docs/*.md link only to files and headings that
exist (GitHub's anchors), every `python -m lasp...` they name answers --help, and the README stays short."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250
HELP_TIMEOUT_S = 180

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
MODULE = re.compile(r"python\s+-m\s+(lasp(?:\.\w+)+)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (before de-duplication): inline markup reduced to its text,
    lowercase, every character but letters, digits, spaces, hyphens and underscores dropped, spaces to
    hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor in a Markdown text; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(text):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        if base in seen:
            seen[base] += 1
            name = f"{base}-{seen[base]}"
        else:
            seen[base] = 0
            name = base
        out.add(name)
    return out


def prose_blocks(text: str):
    """(first line number, text) of each run of non-blank lines outside fenced code blocks."""
    block: list[str] = []
    first = prev = 0
    for n, line in prose_lines(text):
        if block and (not line.strip() or n != prev + 1):
            yield first, "\n".join(block)
            block = []
        if line.strip():
            if not block:
                first = n
            block.append(line)
        prev = n
    if block:
        yield first, "\n".join(block)


def links(text: str):
    """(line number, target) of every Markdown link or image outside code blocks and code spans; a link's
    text may run over a line break."""
    for first, block in prose_blocks(text):
        # code spans blanked out, line breaks kept, so offsets still give line numbers
        block = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), block)
        for m in LINK.finditer(block):
            yield first + block.count("\n", 0, m.start()), m.group(1)


def link_problems(docs: dict[str, str], exists, read) -> list[str]:
    """Every relative link in `docs` ({path: text}) whose file does not exist (relative to the linking
    file) or whose #anchor is no heading of the target; `exists(path)` and `read(path)` look up the other
    files. http(s) and mailto links are not checked."""
    problems = []
    for path, text in docs.items():
        for n, target in links(text):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                continue  # http:, https:, mailto:
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            where = f"{path}:{n}: ({target})"
            if file and not exists(dest):
                problems.append(f"{where}: no file {dest}")
                continue
            if anchor and dest.endswith(".md"):
                if anchor not in anchors(docs[dest] if dest in docs else read(dest)):
                    problems.append(f"{where}: no heading #{anchor} in {dest}")
    return problems


def test_the_link_checker_finds_what_it_should():
    docs = {
        "README.md": (
            "# Top\n\n## Same\n\n## Same\n\n"
            "[ok](docs/a.md) [ok](docs/a.md#packed-documents-cu_seqlens) [ok](#same-1) [ok](#top)\n"
            "[web](https://example.com/x#y) `[code](nowhere.md)`\n"
            "```\n[fenced](nowhere.md)\n```\n"
            "[missing file](docs/b.md) [missing heading](docs/a.md#nope) [third](#same-2)\n"
            "\nA [link split over\ntwo lines](docs/a.md#gone).\n"
        ),
        "docs/a.md": "# A page\n\n## Packed documents (`cu_seqlens`)\n\n[back](../README.md#same)\n",
    }
    problems = link_problems(docs, exists=lambda p: p in docs, read=docs.__getitem__)
    assert len(problems) == 4, problems
    assert "README.md:14: (docs/a.md#gone): no heading #gone in docs/a.md" in problems
    assert "README.md:12: (docs/b.md): no file docs/b.md" in problems
    assert "README.md:12: (docs/a.md#nope): no heading #nope in docs/a.md" in problems
    assert "README.md:12: (#same-2): no heading #same-2 in README.md" in problems
    assert slug("Modelled, not measured: the paper's scale") == "modelled-not-measured-the-papers-scale"
    assert slug("parallelize: TP, SP, PP, DP and ZeRO") == "parallelize-tp-sp-pp-dp-and-zero"
    assert slug("Read [the docs](x.md) / `a_b`") == "read-the-docs--a_b"


def test_every_relative_link_resolves():
    docs = {os.path.relpath(p, ROOT): p.read_text(encoding="utf-8") for p in doc_files()}
    problems = link_problems(
        docs, exists=lambda p: (ROOT / p).exists(), read=lambda p: (ROOT / p).read_text(encoding="utf-8")
    )
    assert not problems, "broken links:\n" + "\n".join(problems)


LAYOUT_ENTRY = re.compile(r"^( *)(\S+(?:\.py|/))(?=\s|$)")


def first_fenced_block(text: str) -> list[tuple[int, str]]:
    """(line number, line) of each line inside a Markdown text's first fenced code block."""
    lines, inside = [], False
    for n, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            if inside:
                break
            inside = True
        elif inside:
            lines.append((n, line))
    return lines


def layout_paths(lines) -> tuple[list[str], list[str]]:
    """The paths a map of the source tree (docs/code-layout.md) lists, relative to the repository, and the
    problems of its form. `lines` are (line number, line). An entry is a line whose first word ends in `.py`
    or `/`: at the margin a path (`lasp/sp/`, `lasp/cli.py`, `configs/`), indented two spaces more than the
    folder above it a name inside that folder (`halo.py`, `linear_attn/`). Any other line continues a
    description."""
    paths: list[str] = []
    problems: list[str] = []
    open_: list[tuple[int, str]] = []  # (indent, path) of the entries this line may nest under
    for n, line in lines:
        m = LAYOUT_ENTRY.match(line)
        if not m:
            continue
        indent, name = len(m.group(1)), m.group(2)
        while open_ and open_[-1][0] >= indent:
            open_.pop()
        if indent == 0:
            path = name
        elif not open_:
            problems.append(f"{n}: {name} is indented under nothing")
            continue
        else:
            parent_indent, parent = open_[-1]
            if not parent.endswith("/"):
                problems.append(f"{n}: {name} is indented under {parent}, which is not a folder")
                continue
            if indent != parent_indent + 2:
                problems.append(f"{n}: {name} is indented {indent - parent_indent} spaces under {parent}, not 2")
            path = parent + name
        if path in paths:
            problems.append(f"{n}: {path} is listed twice")
        paths.append(path)
        open_.append((indent, path))
    return paths, problems


def test_the_code_layout_parser_finds_what_it_should():
    block = (
        "lasp/kernels/       single-device math; see scan.py\n"
        "  scan.py           scans over states, and the algebra of\n"
        "                    a chunk as an affine map (op.py uses it)\n"
        "  linear_attn/      linear attention on one device\n"
        "    chunk.py          the chunked kernel, beside naive.py\n"
        "                      and gated/ words that only describe\n"
        "  backend.py        auto | torch | triton\n"
        "lasp/cli.py         the checks\n"
        "                    of lasp/ tools\n"
        "docs/               this documentation\n"
    )
    paths, problems = layout_paths(enumerate(block.splitlines(), start=1))
    assert not problems, problems
    assert paths == [
        "lasp/kernels/",
        "lasp/kernels/scan.py",
        "lasp/kernels/linear_attn/",
        "lasp/kernels/linear_attn/chunk.py",
        "lasp/kernels/backend.py",
        "lasp/cli.py",
        "docs/",
    ]
    bad = (
        "  orphan.py  x\nlasp/sp/  x\n   api.py  three spaces\nlasp/cli.py  x\n  core.py  under a module\nlasp/sp/  y\n"
    )
    paths, problems = layout_paths(enumerate(bad.splitlines(), start=1))
    assert paths == ["lasp/sp/", "lasp/sp/api.py", "lasp/cli.py", "lasp/sp/"]
    assert problems == [
        "1: orphan.py is indented under nothing",
        "3: api.py is indented 3 spaces under lasp/sp/, not 2",
        "5: core.py is indented under lasp/cli.py, which is not a folder",
        "6: lasp/sp/ is listed twice",
    ]
    text = "# Page\n\n```\nlasp/a.py  x\n```\n\n```\nlasp/b.py  y\n```\n"
    assert first_fenced_block(text) == [(4, "lasp/a.py  x")]


def test_the_code_layout_lists_every_module():
    """docs/code-layout.md's map lists every package and module of lasp/ (`__init__.py` aside), and only
    those; every other folder or file it lists exists."""
    paths, problems = layout_paths(first_fenced_block((ROOT / "docs" / "code-layout.md").read_text(encoding="utf-8")))
    assert not problems, "docs/code-layout.md's map:\n" + "\n".join(f"  line {p}" for p in problems)
    listed = {p for p in paths if p.startswith("lasp/")}
    sources = [p.relative_to(ROOT) for p in (ROOT / "lasp").rglob("*.py")]
    modules = {p.as_posix() for p in sources if p.name != "__init__.py"}
    packages = {f"{p.parent.as_posix()}/" for p in sources if p.parent != Path("lasp")}
    missing = sorted((modules | packages) - listed)
    extra = sorted(listed - (modules | packages)) + sorted(
        p for p in paths if not p.startswith("lasp/") and not (ROOT / p).exists()
    )
    assert not missing and not extra, (
        "docs/code-layout.md does not list: "
        + (", ".join(missing) or "-")
        + "\ndocs/code-layout.md lists what the tree lacks: "
        + (", ".join(extra) or "-")
    )


CITE = re.compile(r"docs/design\.md,\s*\"([^\"]+)\"")


def design_citations(text: str) -> list[str]:
    """The sections of docs/design.md a source text cites, `docs/design.md, "Section"`, also where the
    citation runs over a line break inside a comment or a docstring."""
    return CITE.findall(re.sub(r"\s*\n\s*(?:#\s*)?", " ", text))


def test_every_cited_design_section_exists():
    """Code cites the design by section name; every name cited in lasp/, tests, scripts and examples is a
    heading of docs/design.md, and nothing cites a design document outside the repository."""
    sections = {
        slug(m.group(2))
        for _, line in prose_lines((ROOT / "docs" / "design.md").read_text())
        if (m := HEADING.match(line))
    }
    assert design_citations('x  # see docs/design.md,\n    # "The math" and docs/design.md, "Layouts"') == [
        "The math",
        "Layouts",
    ]
    files = [
        p
        for d in ("lasp", "tests", "scripts", "examples")
        for p in (ROOT / d).rglob("*")
        if p.suffix in (".py", ".sh") and p.name != "test_docs.py"  # this file's own examples
    ]
    cited, outside = {}, []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for name in design_citations(text):
            cited.setdefault(name, []).append(str(path.relative_to(ROOT)))
        if re.search(r"(?<![\w/])DESIGN\.md", text):
            outside.append(str(path.relative_to(ROOT)))
    assert len(cited) >= 5, cited
    missing = {name: where for name, where in cited.items() if slug(name) not in sections}
    assert not missing, f"cited sections that docs/design.md lacks: {missing}"
    assert not outside, f"these cite a DESIGN.md outside the repository: {outside}"


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, at most {README_MAX_LINES}"


HELP_RUNNER = """
import contextlib, io, json, runpy, sys, traceback
failed = {}
for m in sys.argv[1:]:
    sys.argv = [m, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_module(m, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        code, out = 1, io.StringIO(traceback.format_exc())
    if code != 0:
        failed[m] = f"exit status {code}\\n{out.getvalue()[-2000:]}"
print(json.dumps(failed))
"""


def test_every_named_module_answers_help():
    """Like `python -m X --help` for each module the docs name, in one process: torch is imported once."""
    modules = sorted({m for p in doc_files() for m in MODULE.findall(p.read_text(encoding="utf-8"))})
    assert modules, "the docs name no python -m lasp... command"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    run = subprocess.run(
        [sys.executable, "-c", HELP_RUNNER, *modules],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=HELP_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    failed = json.loads(run.stdout.strip().splitlines()[-1])
    assert not failed, "\n\n".join(f"python -m {m} --help: {why}" for m, why in failed.items())
