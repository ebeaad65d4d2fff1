"""Every flag of every finetune/*.py script has a description in `--help`, and the groups read cleanly."""

import argparse
import re

import pytest

from lit_gpt.args import build_parser


@pytest.mark.parametrize("finetuning", ["full", "lora", "qlora"])
def test_every_flag_has_help(finetuning):
    parser = build_parser(finetuning)
    missing = [a.option_strings[-1] for a in parser._actions
               if a.option_strings and a.help != argparse.SUPPRESS and not (a.help or "").strip()]
    assert not missing, f"flags without a description: {missing}"
    for group in parser._action_groups:
        assert not re.match(r"\w+\(", group.title or ""), f"group heading reads as a signature: {group.title}"
    text = parser.format_help()
    assert "LoRAConfig(" not in text
    assert "peak learning rate" in text and "target fraction of residual branches" in text
