"""Peak memory of one HF -> lit conversion, in a fresh process (used by tests/lit_gpt/test_convert_memory.py).

    python tests/helpers/convert_memory_worker.py MODE CHECKPOINT_DIR WARMUP_DIR

Converts WARMUP_DIR (a tiny checkpoint) first, so that one-time costs (lazy imports, allocator arenas) are paid,
then prints as JSON how far the process's peak resident memory (`ru_maxrss`) grew while converting CHECKPOINT_DIR
to float16. MODE `lazy` converts as the script does; `eager` reads every shard whole before converting (what the
lazy reader avoids); `empty` converts nothing, to measure the harness itself.
"""

import json
import resource
import sys
from pathlib import Path

import torch

from lit_gpt import convert


def eager_tensors(files: list[Path]):
    """Every tensor of every shard read up front, then handed out one by one."""
    from safetensors.torch import load_file

    loaded = [(name, file, value) for file in files for name, value in load_file(str(file)).items()]
    return (convert.LazyTensor(name, file, lambda value=value: value) for name, file, value in loaded)


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main() -> None:
    torch.set_num_threads(1)
    mode, checkpoint_dir, warmup_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "eager":
        convert.iter_hf_tensors = eager_tensors
    convert.convert_hf_checkpoint(warmup_dir, dtype="float16")
    before = peak_bytes()
    if mode != "empty":
        convert.convert_hf_checkpoint(checkpoint_dir, dtype="float16")
    print(json.dumps({"growth": peak_bytes() - before}))


if __name__ == "__main__":
    main()
