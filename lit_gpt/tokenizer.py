"""One tokenizer interface over HF `tokenizer.json` files and SentencePiece `tokenizer.model` files.

Special tokens are decided here, never by the backend: HF post-processors and SentencePiece options
differ between checkpoints, so text is always encoded without specials and BOS/EOS are added from
`tokenizer_config.json` / `generation_config.json` (with LLaMA's behaviour as the default).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from lit_gpt.utils import UserError, read_json_object, read_text_file

# The files a checkpoint folder's tokenizer is read from; scripts that write a new folder copy them all.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer_files(source: str | Path, destination: str | Path) -> list[str]:
    """Copy the tokenizer files `source` has into `destination`, each atomically; returns the names copied."""
    import shutil

    from lit_gpt.utils import atomic_path

    source, destination = Path(source), Path(destination)
    copied = []
    if source.resolve() == destination.resolve():
        return copied
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            with atomic_path(destination / name) as tmp:
                shutil.copyfile(source / name, tmp)
            copied.append(name)
    return copied


_DOWNLOAD_HINT = ("download the tokenizer files with "
                  "`python scripts/download.py --repo_id ORG/NAME --tokenizer_only true`")


class Tokenizer:
    def __init__(self, checkpoint_dir: str | Path) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise UserError(f"tokenizer folder {str(checkpoint_dir)!r} does not exist: {_DOWNLOAD_HINT}")
        self.checkpoint_dir = checkpoint_dir
        tokenizer_config = _read_json(checkpoint_dir / "tokenizer_config.json")
        generation_config = _read_json(checkpoint_dir / "generation_config.json")

        if (checkpoint_dir / "tokenizer.json").is_file():
            self.backend = "huggingface"
            self._backend = _HFBackend(checkpoint_dir / "tokenizer.json")
        elif (checkpoint_dir / "tokenizer.model").is_file():
            self.backend = "sentencepiece"
            self._backend = _SentencePieceBackend(checkpoint_dir / "tokenizer.model")
        else:
            raise UserError(f"{checkpoint_dir} has neither tokenizer.json nor tokenizer.model: {_DOWNLOAD_HINT}")

        self.vocab_size: int = self._backend.vocab_size
        self.bos_id = self._special_id(tokenizer_config.get("bos_token"), generation_config.get("bos_token_id"),
                                       self._backend.default_bos_id)
        self.stop_ids = self._stop_ids(tokenizer_config.get("eos_token"), generation_config.get("eos_token_id"))
        self.eos_id: int | None = self.stop_ids[0] if self.stop_ids else None
        add_bos = tokenizer_config.get("add_bos_token")
        if add_bos is None:
            add_bos = self._backend.adds_bos_by_default(self.bos_id)
        # A tokenizer without a BOS token cannot add one, whatever the config says.
        self.use_bos: bool = bool(add_bos) and self.bos_id is not None
        self.chat_template: str | None = _chat_template(checkpoint_dir, tokenizer_config)

    # ------------------------------------------------------------------ special tokens
    def _special_id(self, token: Any, generation_id: Any, default: int | None) -> int | None:
        """The id generation_config.json gives, else that of tokenizer_config.json's token, else the backend's."""
        first_generation_id = _first(generation_id)
        if first_generation_id is not None:
            return first_generation_id
        from_config = self.token_to_id(_token_content(token))
        return from_config if from_config is not None else default

    def _stop_ids(self, eos_token: Any, generation_eos: Any) -> list[int]:
        """Every id that ends generation: generation_config's eos id(s), then tokenizer_config's eos token."""
        ids = [int(i) for i in _as_list(generation_eos)]
        config_eos = self.token_to_id(_token_content(eos_token))
        if config_eos is not None and config_eos not in ids:
            ids.append(config_eos)
        if not ids and self._backend.default_eos_id is not None:
            ids.append(self._backend.default_eos_id)
        return ids

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self._backend.id_to_token(token_id)

    # ------------------------------------------------------------------ encode / decode
    def encode(
        self, text: str, bos: bool | None = None, eos: bool = False, max_length: int = -1,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Token ids of `text` as a 1-D LongTensor; `bos=None` follows the checkpoint's `use_bos`.

        Special tokens written in the text (e.g. `<|im_start|>` from a chat template) become their ids, and a
        BOS already at the start of the text is not added a second time.
        """
        ids = self._backend.encode(text, self._special_tokens())
        if self.use_bos if bos is None else bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token; encode with bos=False")
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise ValueError("this tokenizer has no EOS token; encode with eos=False")
            ids = ids + [self.eos_id]
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long, device=device)

    def decode(self, ids: torch.Tensor | Iterable[int]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self._backend.decode([int(i) for i in ids])

    def _special_tokens(self) -> list[str]:
        """BOS/EOS spellings, which SentencePiece would otherwise encode as plain text."""
        return [self.id_to_token(i) for i in (self.bos_id, self.eos_id) if i is not None]

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the checkpoint's Jinja chat template, as `transformers` does, into one prompt string."""
        if self.chat_template is None:
            raise UserError(
                f"{self.checkpoint_dir} has no chat template (tokenizer_config.json 'chat_template'): "
                f"pass --chat_template false to use the prompt as it is"
            )
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        # trim_blocks/lstrip_blocks are what HF renders templates with; templates are written for them.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                bos_token=self.id_to_token(self.bos_id) if self.bos_id is not None else "",
                eos_token=self.id_to_token(self.eos_id) if self.eos_id is not None else "",
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.TemplateError as e:
            raise UserError(f"the chat template of {self.checkpoint_dir} rejected the messages: {e}") from None


# ---------------------------------------------------------------------- backends
class _HFBackend:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tokenizer = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a plain Exception for malformed files
            raise UserError(f"could not read {path} ({_first_line(e)}): {_DOWNLOAD_HINT}") from None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.default_bos_id = None
        self.default_eos_id = None

    def adds_bos_by_default(self, bos_id: int | None) -> bool:
        """Follow the post-processor: some tokenizer.json files (Llama 3) add BOS there and nowhere else."""
        if bos_id is None:
            return False
        ids = self.tokenizer.encode("", add_special_tokens=True).ids
        return bool(ids) and ids[0] == bos_id

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id)

    def encode(self, text: str, special_tokens: list[str]) -> list[int]:
        # Added special tokens in the text are still matched; only the post-processor's additions are off.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


class _SentencePieceBackend:
    def __init__(self, path: Path) -> None:
        from sentencepiece import SentencePieceProcessor

        self.processor = SentencePieceProcessor()
        try:
            self.processor.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise UserError(f"could not read {path} ({_first_line(e)}): {_DOWNLOAD_HINT}") from None
        self.vocab_size = self.processor.vocab_size()
        self.default_bos_id = _non_negative(self.processor.bos_id())
        self.default_eos_id = _non_negative(self.processor.eos_id())

    def adds_bos_by_default(self, bos_id: int | None) -> bool:
        return bos_id is not None  # LLaMA's tokenizers always start with BOS

    def token_to_id(self, token: str) -> int | None:
        token_id = self.processor.piece_to_id(token)
        # piece_to_id answers unk_id for unknown pieces; only the unk piece itself may map there.
        is_known = token_id != self.processor.unk_id() or token == self.processor.id_to_piece(token_id)
        return token_id if is_known else None

    def id_to_token(self, token_id: int) -> str:
        return self.processor.id_to_piece(token_id)

    def encode(self, text: str, special_tokens: list[str]) -> list[int]:
        # SentencePiece encodes "<s>" as the characters '<', 's', '>'; a rendered chat template means the token.
        if not special_tokens:
            return self.processor.encode(text)
        pattern = "(" + "|".join(re.escape(t) for t in sorted(set(special_tokens), key=len, reverse=True)) + ")"
        ids: list[int] = []
        for i, part in enumerate(re.split(pattern, text)):
            if i % 2:
                ids.append(self.processor.piece_to_id(part))
            elif part:
                ids.extend(self.processor.encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


# ---------------------------------------------------------------------- config files
def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    return read_json_object(path, _DOWNLOAD_HINT)


def _chat_template(checkpoint_dir: Path, tokenizer_config: dict) -> str | None:
    # Newer HF repos keep the template in its own file instead of tokenizer_config.json.
    if (checkpoint_dir / "chat_template.jinja").is_file():
        return read_text_file(checkpoint_dir / "chat_template.jinja", _DOWNLOAD_HINT) or None
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _token_content(token: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _first(value: Any) -> int | None:
    values = _as_list(value)
    return int(values[0]) if values else None


def _non_negative(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
