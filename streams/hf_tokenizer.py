"""A Hugging Face model's own tokenizer behind the ``Tokenizer`` interface (issue 11), and the rules for
finding a Hugging Face model's files offline, which loading a base model (``lifelong_peer.attach``)
shares. Reading a stream never loads the model-surgery code: streams import no model code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lifelong_peer.errors import UserError


def offline() -> bool:
    flags = (os.environ.get(v, "").strip().lower() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def check_local_dir(name: str, weights: bool) -> None:
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"base model {name!r}: no such directory")
    if not path.is_dir():
        raise UserError(f"base model {name!r}: not a directory")
    if not (path / "config.json").is_file():
        raise UserError(f"base model {name!r}: config.json is missing")
    if weights and not any(path.glob("*.safetensors")):
        raise UserError(
            f"base model {name!r}: no *.safetensors weights (lifelong-peer does not load pickled .bin files)"
        )


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why ``url`` cannot be reached (refused, no such host, timed out...), or None when it answers at all."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # an answer (401, 404...): the hub is there; the client reports what it says
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return getattr(reason, "strerror", None) or str(reason)
    return None


def cache_only(name_or_path: str) -> str | None:
    """Why ``from_pretrained(name_or_path)`` must read the Hugging Face cache only, or None (a local directory,
    or the hub answers). Offline without HF_HUB_OFFLINE, the hub client retried ~50 s before failing or falling
    back to its cache; one short probe of the hub decides instead (as for ``hf:`` datasets, issue 25)."""
    if offline():
        return "HF_HUB_OFFLINE is set"
    if Path(name_or_path).expanduser().exists():
        return None
    problem = hub_unreachable(f"{hub_endpoint()}/api/models/{name_or_path}")
    return f"cannot reach the Hugging Face Hub at {hub_endpoint()} ({problem})" if problem else None


def load_error(what: str, name: str, error: Exception, cache_only: str | None = None) -> UserError:
    """One sentence for a model or tokenizer ``from_pretrained`` could not load; when only the cache could be
    read (``cache_only``: why), name what is missing from it."""
    if cache_only is None:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return UserError(f"{what} {name!r}: could not load it ({first})")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id
        cached = False
    missing = (
        "its files are" if what == "tokenizer" else "its *.safetensors weights are" if cached else "its config.json is"
    )
    return UserError(
        f"{what} {name!r}: {missing} not in the Hugging Face cache and {cache_only}; "
        f"download it where there is internet (hf download {name}) or give a local directory"
    )


class HFTokenizer:
    """A Hugging Face tokenizer behind the ``lifelong_peer.streams.tokenize.Tokenizer`` interface.

    No special tokens are added by ``encode``; ``separator_id`` (end-of-text, else beginning-of-text)
    is what to place between packed documents. Bits per byte stay comparable with the byte model
    because evaluation divides by the UTF-8 bytes behind the tokens, not by tokens.
    """

    def __init__(self, name_or_path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UserError("Hugging Face tokenizers need transformers: pip install 'lifelong-peer[hf]'") from None
        local = Path(name_or_path).expanduser()
        if local.exists():
            check_local_dir(name_or_path, weights=False)
        why = cache_only(name_or_path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                str(local) if local.exists() else name_or_path, local_files_only=why is not None
            )
        except (OSError, ValueError) as e:
            raise load_error("tokenizer", name_or_path, e, why) from None
        self.name = f"hf:{name_or_path}"
        self.vocab_size = len(self.tokenizer)
        sep = self.tokenizer.eos_token_id
        self.separator_id = sep if sep is not None else self.tokenizer.bos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def fingerprint(self) -> str:
        """sha256 of what fixes the ids: the full tokenizer definition (fast tokenizers) or the vocabulary,
        plus the separator. Equal for the same tokenizer however it was named (hub name or local copy)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        definition = backend.to_str() if backend is not None else json.dumps(sorted(self.tokenizer.get_vocab().items()))
        return hashlib.sha256(f"{definition}\n{self.separator_id}".encode()).hexdigest()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))
