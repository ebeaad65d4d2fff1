"""CI must run the README's own set-up commands, so that a green CI proves the README works."""

import re

from conftest import ROOT


def readme_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Set up a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_ci_runs_the_readme_install_and_test_commands_verbatim():
    install, test = readme_commands()
    assert install.startswith("pip install torch==2.13.0") and test == "python -m pytest -q"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci_lines and test in ci_lines
    assert ci_lines.index(install) < ci_lines.index(test)
