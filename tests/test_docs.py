"""The docs say what the code and the shipped files do: environment variables listed once and
completely, the same EMQX settings everywhere, prerequisites, commits that exist, a complete
plugin compatibility reference, and the packaging metadata."""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib.metadata import distributions
from pathlib import Path

import yaml

from exhook.cli.parser import parse_args
from exhook.config import _KNOWN_FIELDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
ENV_NAME = re.compile(r"`([A-Z][A-Z0-9_]+)`")


def _hocon_reads(path: Path) -> set[str]:
    code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    return set(re.findall(r"\$\{\?([A-Z][A-Z0-9_]*)\}", code))


def _hocon_files() -> dict[str, set[str]]:
    files = {"config.hocon": ROOT / "config.hocon"}
    files.update({f"deploy/{p.name}": p for p in (ROOT / "deploy").glob("*.hocon")})
    return {name: _hocon_reads(path) for name, path in files.items()}


def _variables_in_use() -> set[str]:
    used = set().union(*_hocon_files().values())
    for path in (ROOT / "exhook").rglob("*.py"):  # read by the code itself
        used |= set(re.findall(r"os\.environ\.get\(\"([A-Z][A-Z0-9_]+)\"", path.read_text()))
    compose = (ROOT / "docker-compose.yml").read_text().replace("$$", "")
    used |= set(re.findall(r"\$\{(\w+)[:}]", compose))
    used |= set(re.findall(r"os\.environ\.get\('([A-Z][A-Z0-9_]+)'", (ROOT / "Dockerfile").read_text()))
    return used


def _env_table() -> list[tuple[list[str], str]]:
    """Rows of the README's environment table: (variables, 'read by' column)."""
    section = README.split("### Environment variables", 1)[1].split("\n#", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| `")]
    return [(ENV_NAME.findall(cells[0]), cells[1]) for cells in rows]


def test_every_environment_variable_is_in_the_readme_table_exactly_once() -> None:
    listed = [name for names, _ in _env_table() for name in names]
    assert len(listed) == len(set(listed)), "a variable is listed twice"
    assert set(listed) == _variables_in_use()


def test_the_table_names_every_config_file_that_reads_a_variable() -> None:
    readers = _hocon_files()
    for names, read_by in _env_table():
        for name in names:
            files = {f for f, reads in readers.items() if name in reads}
            named = set(re.findall(r"`([\w/]+\.hocon)`", read_by))
            assert files <= named, (name, files, named)


def test_the_deploy_config_reads_its_fields_from_the_same_variables_as_the_shipped_one() -> None:
    files = _hocon_files()
    deploy = set().union(*(reads for name, reads in files.items() if name.startswith("deploy/")))
    assert deploy <= files["config.hocon"], sorted(deploy - files["config.hocon"])


def _default(option: str) -> str:
    """What ``register`` sends EMQX when ``option`` is not given."""
    return str(getattr(parse_args(["register"]), option.removeprefix("--").replace("-", "_")))


def test_emqx_exhook_settings_agree_everywhere() -> None:
    """auto_reconnect and failed_action: README's emqx.conf, docs/deploy.md's, compose and register."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["emqx"]["environment"]
    deploy_md = (ROOT / "docs" / "deploy.md").read_text()
    for field, option in (("auto_reconnect", "--auto-reconnect"), ("failed_action", "--failed-action")):
        in_docs = re.findall(rf"^\s+{field} = (\S+)", README + deploy_md, re.MULTILINE)
        assert len(in_docs) == 2, in_docs
        values = {*in_docs, str(compose[f"EMQX_EXHOOK__SERVERS__1__{field.upper()}"]), _default(option)}
        assert len(values) == 1, (field, values)
    assert _default("--auto-reconnect") == "10s" and _default("--failed-action") == "ignore"


def test_prerequisites_are_stated() -> None:
    section = README.split("## Prerequisites", 1)[1].split("\n## ", 1)[0]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11" and "Python 3.11 or later" in section
    for needed in ("apt-get", "root", "Debian", "promtool", "constraints.txt"):
        assert needed in section, needed
    # the first two commands stay the README's first lines of code
    assert README.split("```sh\n", 1)[1].startswith("make run    # ") and "\nmake test   # " in README[:400]


def test_benchmarks_cite_only_commits_that_exist() -> None:
    text = (ROOT / "BENCHMARKS.md").read_text()
    cited = set(re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", text))
    assert cited, "the reference run names its code"
    for commit in cited:
        found = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True)
        assert found.returncode == 0, f"BENCHMARKS.md cites {commit}, which is not in the history"
    # the generated section names the code it measured, and no note says it is stale
    assert re.search(r"^Code: [0-9a-f]{7,40}", text.split("<!-- bench:generated:begin", 1)[1], re.MULTILINE)
    assert "To be regenerated" not in text


def test_the_plugin_reference_covers_every_plugin_block_field() -> None:
    text = (ROOT / "docs" / "plugin-2.0.0-notes.md").read_text()
    table = text.split("## Configuration fields", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)`", table, re.MULTILINE))
    documented |= {name for names in re.findall(r"^\| ((?:`\w+`,? ?)+) \|", table, re.MULTILINE)
                   for name in re.findall(r"`(\w+)`", names)}
    fields = (_KNOWN_FIELDS["mysql."] | _KNOWN_FIELDS["redis."])
    assert fields <= documented, sorted(fields - documented)


def test_license_and_urls_in_the_package_metadata() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert project["urls"] and all(url.startswith("https://") for url in project["urls"].values())


def test_constraints_pin_exactly_what_the_tests_run_with() -> None:
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pins = {norm(name): version for name, version in (
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#"))}
    installed = {norm(d.metadata["Name"]): d.version for d in distributions()}
    # every pin is what this venv runs (a developer's extra tools, e.g. py-spy, may come on top)
    assert {name: installed.get(name) for name in pins} == pins, "run `make constraints`"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    names = {norm(re.split(r"[<>=\[ ;]", requirement, maxsplit=1)[0]) for requirement in declared}
    assert names <= set(pins), sorted(names - set(pins))
