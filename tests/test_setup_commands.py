"""CI must run the README's own set-up commands, so that a green CI proves the README works."""

import re

from conftest import ROOT


def readme_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Set up a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_ci_runs_the_readme_install_and_test_commands_verbatim():
    install, test = readme_commands()
    install_lines = install.splitlines()
    assert any(line.startswith("pip install torch==2.13.0") for line in install_lines)
    assert test == "python -m pytest -q"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    positions = [ci_lines.index(line) for line in install_lines]  # each README line, in order, before the tests
    assert positions == sorted(positions) and positions[-1] < ci_lines.index(test)
