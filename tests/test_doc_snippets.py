"""Every snippet in README.md and docs/ works: Python snippets run (with tiny random teachers where
the real ones need a network); shell snippets are valid bash, name files that exist, and use only
options that their command has (running them all would take hours)."""

from __future__ import annotations

import re
import shlex
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# Python snippets tested elsewhere, by the test that says so
TESTED_ELSEWHERE = {("README.md", "from apm import APM"): "tests/test_perceive.py",
                    ("adding_a_teacher.md", "class ResNetTeacher"): "tests/test_new_teacher.py"}
# Real teachers that need a network, and the tiny random ones that stand in for them offline
OFFLINE = {'create_teacher("clip_vit_b16", image_size=224)':
           'create_teacher("clip_tiny", image_size=224, pretrained=False)'}
TOOLS = ("islands", "eval", "interpolate", "perceive", "classify", "segment", "solve")


def snippets(kind: str) -> list[tuple[str, int, str]]:
    """(file name, line, text) of every ``kind`` block in the docs."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == kind:
                out.append((doc.name, text[: m.start()].count("\n") + 1, m.group(2)))
    return out


def _id(s: tuple[str, int, str]) -> str:
    return f"{s[0]}:{s[1]}"


PY = snippets("python")
SH = snippets("bash")


@pytest.mark.parametrize("snippet", PY, ids=[_id(s) for s in PY])
def test_python_snippets_run(snippet, tmp_path, monkeypatch):
    name, line, code = snippet
    elsewhere = [t for (doc, mark), t in TESTED_ELSEWHERE.items() if doc == name and mark in code]
    if elsewhere:
        assert (ROOT / elsewhere[0]).is_file()
        pytest.skip(f"run by {elsewhere[0]}")
    for real, tiny in OFFLINE.items():
        code = code.replace(real, tiny)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{name}:{line}", "exec"), {"__name__": "snippet"})


def commands(block: str) -> list[str]:
    """The command lines of a bash block: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for raw in joined.splitlines():
        line = raw.split(" #")[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


@lru_cache(maxsize=None)
def options_of(command: str) -> frozenset[str]:
    """The long options ``apm <command> --help`` lists (``fit``: LightningCLI's)."""
    out = subprocess.run(["python", "-m", "apm", command, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    return frozenset(re.findall(r"(--[\w.\-]+)", out.stdout))


def _env() -> dict:
    import os
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _check_command(words: list[str]) -> list[str]:
    """What is wrong with one command line (options it lacks, files that do not exist)."""
    problems = []
    if words[:1] in (["lightning"], ["apm"]) or words[:3] == ["python", "-m", "apm"] or "-m" in words[:6] and "apm" in words:
        at = words.index("apm") + 1 if "apm" in words else 1
        cmd = words[at] if len(words) > at else ""
        if cmd not in ("fit", "validate", "test", "predict", *TOOLS):
            return problems
        known = options_of(cmd)
        for w in words[at + 1:]:
            flag = w.split("=", 1)[0]
            if flag.startswith("--") and flag not in known:
                problems.append(f"apm {cmd} has no option {flag}")
            if w.startswith("configs/") and not (ROOT / w).is_file():
                problems.append(f"{w} does not exist")
    elif words[:1] == ["python"] and len(words) > 1 and words[1].endswith(".py"):
        if not (ROOT / words[1]).is_file():
            problems.append(f"{words[1]} does not exist")
    elif words[:2] == ["python", "-m"]:
        module = words[2].replace(".", "/")
        if not ((ROOT / f"{module}.py").is_file() or (ROOT / module / "__main__.py").is_file()):
            problems.append(f"no module {words[2]}")
    elif words[0].endswith(".sh") and not (ROOT / words[0]).is_file():
        problems.append(f"{words[0]} does not exist")
    return problems


@pytest.mark.parametrize("snippet", SH, ids=[_id(s) for s in SH])
def test_shell_snippets_are_valid_and_use_real_options(snippet):
    name, line, block = snippet
    syntax = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
    assert syntax.returncode == 0, f"{name}:{line}: {syntax.stderr}"
    problems = []
    for cmd in commands(block):
        try:
            words = shlex.split(cmd)
        except ValueError as e:
            problems.append(f"{cmd!r}: {e}")
            continue
        while words and words[0] in ("srun", "env") or (words and "=" in words[0] and not words[0].startswith("-")):
            words = words[1:]
        if words[:1] == ["torchrun"]:
            words = ["python", *words[words.index("-m"):]] if "-m" in words else []
        if words:
            problems += [f"{cmd[:80]}: {p}" for p in _check_command(words)]
    assert not problems, f"{name}:{line}: " + "; ".join(problems)
