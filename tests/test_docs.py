"""The README and docs/ against the repository: every shell command they show names things that exist.

Each fenced `bash` / `sh` / `shell` / `console` block of README.md and docs/*.md is split into commands (a
trailing backslash continues a line, `#` starts a comment, `[...]` marks an optional argument, `a -- b` runs b
under a) and each command is checked by what it runs:

- `make T [VAR=v]`: T is a target of the Makefile, VAR one of its variables, a `CONFIG=` file exists;
- `python -m M ...` / `python path.py ...`: the module imports or the script exists; every `--flag` it is given
  is one the module or script defines (absl `DEFINE_*("name"` or argparse `add_argument("--name"`);
- a `--config=configs/X.py` argument (of any command): the file exists, and every `--config.a.b=v` override
  names a field of the ConfigDict its `get_config()` returns; a `pipeline=` override names its stages;
- a repository script run directly (`launch/tpu_pod.sh`, `bash scripts/x.sh`, `sbatch launch/gpu_slurm.sbatch`)
  and a test file given to pytest exist; other programs (pip, gcloud, ...) are not the repository's to check.

Placeholders for the user's own things (`<name>`, `my_config.py`, `/abs/...`, `...`) are not checked. Besides,
no README/docs page and no docstring refers to a path outside the repository, and every relative Markdown link
resolves to a file of the repository (docs pages that other branches add may be absent until they merge).
Everything is parsed, nothing is run, so the test takes seconds."""
import ast
import glob
import importlib.util
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
OUTSIDE = ("../shared", "/work/")
SHELL = re.compile(r"^```(?:bash|sh|shell|console)[ \t]*\n(.*?)^```", re.S | re.M)
REPO_DIRS = ("configs/", "bench/", "scripts/", "launch/", "nash_lm/", "tests/", "notebooks/", "docs/")


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _commands(page):
    """(page, command tokens) of every command in the page's shell blocks."""
    out = []
    for block in SHELL.findall(_read(page)):
        text = re.sub(r"\\\n", " ", block)
        for line in text.splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError as e:
                raise AssertionError(f"{page}: cannot parse {line!r}: {e}")
            tokens = [t.strip("[]") for t in tokens if t.strip("[]") not in ("", "...")]
            while tokens:  # `a && b`, `a; b`, `launcher ... -- command`
                for sep in ("&&", ";", "--"):
                    if sep in tokens:
                        i = tokens.index(sep)
                        if tokens[:i]:
                            out.append((page, tokens[:i]))
                        tokens = tokens[i + 1:]
                        break
                else:
                    out.append((page, tokens))
                    tokens = []
    return [(p, t) for p, t in out if t]


ALL = [c for page in PAGES for c in _commands(page)]


def _strip_prefix(tokens):
    """Drops environment assignments and wrappers (`A=b`, `nice -n 10`, `timeout 600`)."""
    while tokens:
        if re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
            tokens = tokens[1:]
        elif tokens[0] == "nice":
            tokens = tokens[3:] if len(tokens) > 2 and tokens[1] == "-n" else tokens[1:]
        elif tokens[0] == "timeout":
            tokens = tokens[2:]
        elif tokens[0] in ("time", "env", "exec"):
            tokens = tokens[1:]
        else:
            break
    return tokens


def _placeholder(value: str) -> bool:
    return "<" in value or value.startswith("/abs") or "..." in value or value.startswith("$")


def _makefile():
    text = _read("Makefile")
    targets = set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M))
    variables = set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*[?:]?=", text, re.M))
    return targets, variables


def _defined_flags(source: str) -> set:
    names = set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", source))
    names |= set(re.findall(r"add_argument\(\s*[\"']--([\w-]+)[\"']", source))
    if names and re.search(r"from nash_lm import main\b", source):  # it reuses the CLI's --config / --workdir
        names |= _defined_flags(_module_source("nash_lm.main"))
    return names


def _module_source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"no module {module}"
    with open(spec.origin, encoding="utf-8") as f:
        return f.read()


_CONFIGS = {}


def _config(path):
    if path not in _CONFIGS:
        spec = importlib.util.spec_from_file_location(f"_docs_config_{len(_CONFIGS)}", os.path.join(ROOT, path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _CONFIGS[path] = module.get_config()
    return _CONFIGS[path]


def _check_config_args(where, tokens):
    config = next((t.split("=", 1)[1] for t in tokens if t.startswith("--config=")), None)
    if config is None or _placeholder(config) or not config.startswith("configs/"):
        return  # no config, or the user's own file
    assert os.path.isfile(os.path.join(ROOT, config)), f"{where}: --config={config}: no such file"
    cfg = _config(config)
    for t in tokens:
        if not t.startswith("--config.") or "=" not in t:
            continue
        key, value = t[len("--config."):].split("=", 1)
        if _placeholder(key):
            continue
        node = cfg
        for part in key.split("."):
            assert hasattr(node, "keys") and part in node, f"{where}: {t}: no field {key!r} in {config}"
            node = node[part]
        if key.split(".")[-1] == "pipeline":
            parent = cfg
            for part in key.split(".")[:-1]:
                parent = parent[part]
            for name in value.split(","):
                assert name in parent["stages"], f"{where}: {t}: no stage {name!r} in {config}"


def _check_flags(where, args, defined, program):
    if not defined:
        return
    for a in args:
        if not a.startswith("--") or a.startswith("--config."):
            continue
        name = a[2:].split("=", 1)[0]
        ok = name in defined or (name.startswith("no") and name[2:] in defined)
        assert ok, f"{where}: {a}: {program} defines no flag {name!r} (it has {sorted(defined)})"


def _check(page, tokens):
    where = f"{page}: {' '.join(tokens)[:120]}"
    tokens = _strip_prefix(list(tokens))
    if not tokens:
        return
    prog = tokens[0]
    if os.path.basename(prog) == "pytest" or tokens[1:3] == ["-m", "pytest"]:
        for a in tokens[1:]:
            if a.startswith("tests/"):
                assert os.path.exists(os.path.join(ROOT, a.split("::")[0])), f"{where}: {a}: no such test file"
        return
    if prog == "make":
        targets, variables = _makefile()
        for t in tokens[1:]:
            if "=" in t:
                var, value = t.split("=", 1)
                assert var in variables, f"{where}: the Makefile has no variable {var}"
                if var == "CONFIG":
                    assert os.path.isfile(os.path.join(ROOT, value)), f"{where}: {value}: no such file"
            elif not t.startswith("-"):
                assert t in targets, f"{where}: the Makefile has no target {t!r} (targets: {sorted(targets)})"
        return
    if os.path.basename(prog).startswith("python"):
        args = tokens[1:]
        if args[:1] == ["-m"]:
            module = args[1]
            source = _module_source(module)
            args = args[2:]
            program = module
        else:
            script = args[0]
            if _placeholder(script):
                return
            assert os.path.isfile(os.path.join(ROOT, script)), f"{where}: {script}: no such file"
            source = _read(script)
            args = args[1:]
            program = script
        _check_flags(where, args, _defined_flags(source), program)
        _check_config_args(where, args)
        for a in args:  # repository files given as arguments
            value = a.split("=", 1)[1] if a.startswith("--") and "=" in a else a
            if value.startswith(("configs/", "scripts/", "launch/")) and not _placeholder(value):
                assert os.path.exists(os.path.join(ROOT, value)), f"{where}: {value}: no such file"
        return
    if prog in ("bash", "sh") and len(tokens) > 1 and tokens[1].startswith(REPO_DIRS):
        tokens = tokens[1:]
        prog = tokens[0]
    if prog == "sbatch":
        script = next(t for t in tokens if t.endswith(".sbatch"))
        assert os.path.isfile(os.path.join(ROOT, script)), f"{where}: {script}: no such file"
        _check_config_args(where, tokens)
        return
    if prog.startswith(REPO_DIRS):
        assert os.path.isfile(os.path.join(ROOT, prog)), f"{where}: {prog}: no such file"
        _check_config_args(where, tokens)
        return
    # anything else (pip, gcloud, kubectl, ...) is not the repository's to check


def test_the_pages_show_commands():
    assert len(ALL) >= 20  # the parser finds the README's and the docs' commands
    assert any(t[:2] == ["make", "run"] for _, t in ALL)
    assert any("--config=configs/own_data.py" in t for _, t in ALL)


@pytest.mark.parametrize("page,tokens", ALL, ids=[f"{p}:{i}" for i, (p, _) in enumerate(ALL)])
def test_command_names_what_exists(page, tokens):
    _check(page, tokens)


def test_checker_refuses_what_does_not_exist():
    """The checks can fail: a wrong target, field, stage, flag and file are each refused."""
    for bad in (["make", "runn"], ["python", "-m", "nash_lm.main", "--config=configs/tiny.py", "--workdir=w",
                                   "--config.stages.sft.stepz=3"],
                ["python", "-m", "nash_lm.main", "--config=configs/tiny.py", "--config.pipeline=sft,nope"],
                ["python", "-m", "nash_lm.export", "--workdir=w", "--outt=o"],
                ["python", "bench/no_such_bench.py"], ["python", "-m", "pytest", "tests/test_nope.py"], ["python", "-m", "nash_lm.main", "--config=configs/nope.py"]):
        with pytest.raises(AssertionError):
            _check("test", bad)


def test_readme_is_short():
    assert len(_read("README.md").splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES)
def test_pages_stay_inside_the_repository(page):
    text = _read(page)
    for bad in OUTSIDE:
        assert bad not in text, f"{page} refers to {bad!r}, outside the repository"
    base = os.path.dirname(os.path.join(ROOT, page))
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", link) or link.startswith("#"):
            continue
        target = os.path.normpath(os.path.join(base, link.split("#", 1)[0]))
        rel = os.path.relpath(target, ROOT)
        assert not rel.startswith(".."), f"{page}: link {link} leaves the repository"
        assert os.path.exists(target), f"{page}: link {link}: no such file"


def _docstrings(path):
    tree = ast.parse(_read(path))
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                     ast.ClassDef))]
    return [ast.get_docstring(n) or "" for n in nodes]


SOURCES = sorted(os.path.relpath(p, ROOT) for d in ("nash_lm", "configs", "bench", "scripts", "launch", "tests")
                 for p in glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True))


def test_no_docstring_refers_outside_the_repository():
    bad = [(path, s) for path in SOURCES for doc in _docstrings(path) for s in OUTSIDE if s in doc]
    assert not bad, f"docstrings referring outside the repository: {bad}"
