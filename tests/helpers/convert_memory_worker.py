"""Peak memory of one HF -> lit conversion, in a fresh process (used by tests/lit_gpt/test_convert_memory.py).

    python tests/helpers/convert_memory_worker.py MODE CHECKPOINT_DIR WARMUP_DIR

Converts WARMUP_DIR (a tiny checkpoint) first, so that one-time costs (lazy imports, allocator arenas) are paid,
then prints as JSON how far the process's peak resident memory grew while converting CHECKPOINT_DIR to float16.
The peak is the kernel's high-water mark (VmHWM), reset to the current size after the warm-up: `ru_maxrss` cannot
be reset, and a child process starts with its parent's (pytest's, hundreds of MB) as its own, which would hide
everything below it.

MODE `lazy` converts as the script does; `eager` reads every shard whole before converting (what the lazy reader
avoids); `empty` converts nothing, to measure the harness itself.
"""

import json
import sys
from pathlib import Path

import torch

from lit_gpt import convert


def eager_tensors(files: list[Path]):
    """Every tensor of every shard read up front, then handed out one by one."""
    from safetensors.torch import load_file

    loaded = [(name, file, value) for file in files for name, value in load_file(str(file)).items()]
    return (convert.LazyTensor(name, file, lambda value=value: value) for name, file, value in loaded)


def memory_kib(field: str) -> int:
    """A `/proc/self/status` field (VmRSS: resident now, VmHWM: the peak since the last reset), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux 4.0+: VmHWM becomes VmRSS


def main() -> None:
    torch.set_num_threads(1)
    mode, checkpoint_dir, warmup_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "eager":
        convert.iter_hf_tensors = eager_tensors
    convert.convert_hf_checkpoint(warmup_dir, dtype="float16")
    reset_peak()
    before = memory_kib("VmRSS")
    if mode != "empty":
        convert.convert_hf_checkpoint(checkpoint_dir, dtype="float16")
    print(json.dumps({"growth": (memory_kib("VmHWM") - before) * 1024}))


if __name__ == "__main__":
    main()
