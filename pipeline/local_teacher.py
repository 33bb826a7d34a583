"""A local transformers causal LM that generates text with full-vocabulary logprobs.

This is the model side of ``pipeline serve-teacher``. The main design decision is a
hand-written KV-cache decoding loop instead of ``model.generate``. The loop samples
with its own seeded ``torch.Generator``, so a request's seed fixes its output without
touching global RNG state. It stops a row as soon as a stop string appears, and it
reads the raw logits at every step. Reported logprobs are ``log_softmax`` of those raw
logits at temperature 1 over the whole vocabulary, so they are the model's true
distribution. Temperature and top-p change only which token is sampled.

Tokens are reported as bytes, never as a detokenized string. Each vocabulary id maps to
its exact UTF-8 bytes. SentencePiece pieces turn ``▁`` into a space, and byte-fallback
pieces such as ``<0xF0>`` become that single byte. Byte-level BPE pieces (GPT-2 style)
are mapped back through the byte-to-unicode table. Special and added tokens are their
content string (``</s>`` is the 4 bytes ``</s>``). The response text is the
concatenation of the generated tokens' bytes decoded as UTF-8, so the bytes and the
text agree, except that an incomplete or invalid UTF-8 sequence becomes U+FFFD in the
text. A token's text form is its bytes decoded as UTF-8; when they are not valid UTF-8
on their own (a lone byte of a multi-byte character), the text form is ``bytes:``
followed by each byte as ``\\xNN``, the convention of OpenAI's legacy completions.
This keeps the text forms of different tokens distinct.

A generated end-of-sequence token ends the row with finish reason ``stop`` and is not
part of the output, as with OpenAI and vLLM. So does a generated BOS token, because it
starts a new document. llama2.c models such as stories260K were trained with BOS
between stories and no EOS token, and llama2.c's own sampler stops at BOS too.
"""

from __future__ import annotations

import codecs
import inspect
import json
import logging
import re
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PLAIN_TEMPLATE_DOC = (
    "Models whose tokenizer has no chat template get a plain one: the messages' "
    "contents joined by newlines, roles dropped, so a single user message renders "
    "as its own text and the model continues it."
)

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SENTENCEPIECE_SPACE = "\u2581"
# Seeds are reduced to this range because torch.Generator.manual_seed takes 64 bits.
_SEED_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request. All ``n`` rows are sampled from the same prompt."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0


@dataclass
class Completion:
    """One generated row, already cut at EOS, a stop string or ``max_tokens``.

    ``text_offsets[i]`` is the character offset in ``text`` where token ``i`` starts.
    ``top_ids[i]`` and ``top_logprobs[i]`` list the ``top_logprobs`` most likely tokens
    at position ``i``, most likely first.
    """

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"


@dataclass
class GenerationResult:
    prompt_tokens: int
    completions: list[Completion]
    seed: int


@dataclass(frozen=True)
class LoadOptions:
    """Placement of the model.

    ``device`` is auto (cuda when available), cpu, cuda or cuda:N. ``dtype`` is auto
    (the checkpoint's dtype on a GPU, float32 on a CPU) or a torch dtype name.
    """

    device: str = "auto"
    dtype: str = "auto"


class TeacherModel:
    """A causal LM and its tokenizer, with a thread-safe ``generate``.

    ``generate`` holds a lock for the whole request, so concurrent callers run one at
    a time. Build one with :meth:`load`.
    """

    def __init__(self, model: Any, tokenizer: Any, *, name_or_path: str):
        self.model = model
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path
        self.device = next(model.parameters()).device
        self.vocab_size = _usable_vocab_size(model, tokenizer)
        self.max_context = _max_context(model, tokenizer)
        self.end_ids = _end_ids(model, tokenizer)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.token_bytes = build_token_bytes(tokenizer, self.vocab_size)
        self.token_texts = [token_text_from_bytes(b) for b in self.token_bytes]
        self._cache_kwarg = "cache" if _accepts(model, "cache") else "past_key_values"
        self._pass_logits_to_keep = _accepts(model, "logits_to_keep")
        self._lock = threading.Lock()

    @classmethod
    def load(cls, name_or_path: str | Path, options: LoadOptions = LoadOptions()) -> TeacherModel:
        """Load a model directory or hub id with AutoModelForCausalLM and AutoTokenizer."""
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # NOTE: only the CPU path is covered by tests. CUDA placement, the sampling
        # generator on the GPU and checkpoint dtypes other than float32 have not been run.
        device = _resolve_device(options.device)
        dtype = _resolve_dtype(options.dtype, device)
        # transformers 4.56 renamed the torch_dtype argument to dtype.
        major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
        dtype_argument = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **{dtype_argument: dtype})
        model.to(device)
        model.eval()
        logger.debug("loaded %s on %s as %s", name_or_path, device, model.dtype)
        return cls(model, tokenizer, name_or_path=str(name_or_path))

    def encode_prompt(self, prompt: str) -> list[int]:
        """Tokenize a completions prompt, with the tokenizer's special tokens (BOS)."""
        return list(self.tokenizer(prompt, add_special_tokens=True).input_ids)

    def encode_messages(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Render chat messages with the chat template (or the plain one) and tokenize."""
        if self.has_chat_template:
            rendered = self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True
            )
            # The template writes the special tokens itself (BOS included).
            return list(self.tokenizer(rendered, add_special_tokens=False).input_ids)
        rendered = "\n".join(message["content"] for message in messages)
        return self.encode_prompt(rendered)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationResult:
        """Generate ``params.n`` rows after ``prompt_ids``. Blocks while another request runs."""
        seed = secrets.randbits(63) if params.seed is None else params.seed & _SEED_MASK
        with self._lock:
            completions = self._generate_locked(list(prompt_ids), params, seed)
        return GenerationResult(prompt_tokens=len(prompt_ids), completions=completions, seed=seed)

    def _generate_locked(self, prompt_ids: list[int], params: SamplingParams, seed: int) -> list[Completion]:
        rows = [_RowBuilder(self, params.stop) for _ in range(params.n)]
        if params.max_tokens == 0:
            return [row.finish() for row in rows]

        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        # Always compute at least the top-1 so that greedy decoding picks exactly the
        # token that is reported as most likely, ties included.
        top_k = max(params.top_logprobs, 1)
        inputs = torch.tensor([prompt_ids] * params.n, dtype=torch.long, device=self.device)
        cache = None

        with torch.inference_mode():
            for _ in range(params.max_tokens):
                logits, cache = self._forward(inputs, cache)
                logprobs = torch.log_softmax(logits, dim=-1)
                top_values, top_indices = logprobs.topk(top_k, dim=-1)
                chosen = self._choose(logits, top_indices, params, generator)
                chosen_logprobs = logprobs.gather(1, chosen[:, None])[:, 0]

                self._record_step(rows, chosen, chosen_logprobs, top_indices, top_values, params)
                if all(row.finished for row in rows):
                    break
                inputs = chosen[:, None]

        return [row.finish() for row in rows]

    def _forward(self, inputs: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        kwargs: dict[str, Any] = {"input_ids": inputs, "use_cache": True, self._cache_kwarg: cache}
        if self._pass_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        output = self.model(**kwargs)
        new_cache = output.get("cache") if "cache" in output else output.get("past_key_values")
        # float32 so that log_softmax of half-precision logits keeps its small values.
        logits = output.logits[:, -1, : self.vocab_size].float()
        return logits, new_cache

    @staticmethod
    def _choose(
        logits: torch.Tensor,
        top_indices: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator,
    ) -> torch.Tensor:
        if params.temperature == 0:
            return top_indices[:, 0]
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            probs = _nucleus(probs, params.top_p)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    def _record_step(
        self,
        rows: list[_RowBuilder],
        chosen: torch.Tensor,
        chosen_logprobs: torch.Tensor,
        top_indices: torch.Tensor,
        top_values: torch.Tensor,
        params: SamplingParams,
    ) -> None:
        # One device-to-host copy per tensor and step, not one per row.
        chosen_list = chosen.tolist()
        chosen_logprob_list = chosen_logprobs.tolist()
        top_index_list = top_indices[:, : params.top_logprobs].tolist()
        top_value_list = top_values[:, : params.top_logprobs].tolist()

        for i, row in enumerate(rows):
            if row.finished:
                continue
            token_id = chosen_list[i]
            if token_id in self.end_ids:
                row.end_of_sequence()
                continue
            row.append(token_id, chosen_logprob_list[i], top_index_list[i], top_value_list[i])


class _RowBuilder:
    """Accumulates one row's tokens and text, and cuts it at the first stop string."""

    def __init__(self, teacher: TeacherModel, stop: tuple[str, ...]):
        self._token_bytes = teacher.token_bytes
        self._stop = stop
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text_parts: list[str] = []
        self._text_length = 0
        # Per token: the text length after it, and whether the decoder still buffers
        # an incomplete character after it.
        self._ends: list[int] = []
        self._pending: list[bool] = []
        self.completion = Completion()
        self.finish_reason = "length"
        self.finished = False
        self._cut = False

    def append(self, token_id: int, logprob: float, top_ids: list[int], top_logprobs: list[float]) -> None:
        completion = self.completion
        completion.token_ids.append(token_id)
        completion.logprobs.append(logprob)
        completion.top_ids.append(top_ids)
        completion.top_logprobs.append(top_logprobs)
        completion.text_offsets.append(self._text_length)

        piece = self._decoder.decode(self._token_bytes[token_id])
        self._text_parts.append(piece)
        self._text_length += len(piece)
        self._ends.append(self._text_length)
        self._pending.append(bool(self._decoder.getstate()[0]))

        if self._stop:
            self._cut_at_stop()

    def end_of_sequence(self) -> None:
        """End the row because the model generated an end id, which is not appended."""
        self.finish_reason = "stop"
        self.finished = True

    def _cut_at_stop(self) -> None:
        text = "".join(self._text_parts)
        self._text_parts = [text]
        found = [index for index in (text.find(stop) for stop in self._stop) if index >= 0]
        if not found:
            return
        stop_start = min(found)

        # Keep the tokens that end at or before the stop string and leave no
        # incomplete character behind. A token that straddles the start of the stop
        # string is dropped with it, so the text ends on a token boundary and the
        # kept tokens' bytes still spell the text exactly.
        keep = 0
        for i, end in enumerate(self._ends):
            if end > stop_start:
                break
            if not self._pending[i]:
                keep = i + 1
        kept_length = self._ends[keep - 1] if keep else 0

        completion = self.completion
        for values in (
            completion.token_ids,
            completion.logprobs,
            completion.top_ids,
            completion.top_logprobs,
            completion.text_offsets,
        ):
            del values[keep:]
        self._text_parts = [text[:kept_length]]
        self._decoder.reset()
        self.finish_reason = "stop"
        self.finished = True
        self._cut = True

    def finish(self) -> Completion:
        if not self._cut:
            # Flush an incomplete trailing character as U+FFFD.
            self._text_parts.append(self._decoder.decode(b"", final=True))
        self.completion.text = "".join(self._text_parts)
        self.completion.finish_reason = self.finish_reason
        return self.completion


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches ``top_p``."""
    sorted_probs, sorted_indices = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # The most likely token has zero mass before it, so it is always kept.
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, sorted_indices, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def build_token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """Return the exact UTF-8 bytes of every token id below ``vocab_size``."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    added = {
        token_id: token.content
        for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
    }
    byte_level = _uses_byte_level_decoder(tokenizer)
    byte_decoder = _byte_level_decoder() if byte_level else {}

    table = []
    for token_id, piece in enumerate(pieces):
        if token_id in added:
            table.append(added[token_id].encode("utf-8"))
        elif piece is None:
            table.append(b"")
        elif byte_level:
            table.append(_byte_level_piece_bytes(piece, byte_decoder))
        else:
            table.append(_sentencepiece_bytes(piece))
    return table


def token_text_from_bytes(data: bytes) -> str:
    """Return the token's text: its UTF-8, or ``bytes:\\xNN...`` when that is invalid."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)


def _sentencepiece_bytes(piece: str) -> bytes:
    match = _BYTE_PIECE.match(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace(_SENTENCEPIECE_SPACE, " ").encode("utf-8")


def _byte_level_piece_bytes(piece: str, byte_decoder: dict[str, int]) -> bytes:
    try:
        return bytes(byte_decoder[char] for char in piece)
    except KeyError:
        # A piece outside the byte alphabet is plain text (some vocabularies mix both).
        return piece.encode("utf-8")


def _uses_byte_level_decoder(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder")
    return _contains_type(decoder, "ByteLevel")


def _contains_type(node: Any, type_name: str) -> bool:
    if isinstance(node, dict):
        if node.get("type") == type_name:
            return True
        return any(_contains_type(value, type_name) for value in node.values())
    if isinstance(node, list):
        return any(_contains_type(value, type_name) for value in node)
    return False


def _byte_level_decoder() -> dict[str, int]:
    """Invert GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to U+0100 onwards."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {chr(byte): byte for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            mapping[chr(256 + shifted)] = byte
            shifted += 1
    return mapping


def _usable_vocab_size(model: Any, tokenizer: Any) -> int:
    # Some checkpoints pad the embedding matrix beyond the tokenizer. The padding ids
    # are not tokens, so their logits are left out of the distribution.
    output_embeddings = model.get_output_embeddings()
    if output_embeddings is None:
        model_vocab = model.config.vocab_size
    else:
        model_vocab = output_embeddings.weight.shape[0]
    return min(model_vocab, len(tokenizer))


def _max_context(model: Any, tokenizer: Any) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None)]
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel such as 1e30.
    if isinstance(tokenizer_limit, int) and tokenizer_limit < 10_000_000:
        limits.append(tokenizer_limit)
    known = [limit for limit in limits if isinstance(limit, int) and limit > 0]
    if not known:
        raise ValueError(
            "model config has no max_position_embeddings and the tokenizer no model_max_length; "
            "set one of them in the model directory"
        )
    return min(known)


def _end_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Return the ids that end a row: the configured EOS ids and the BOS id."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            ids.add(token_id)
    return frozenset(ids)


def _accepts(model: Any, parameter: str) -> bool:
    return parameter in inspect.signature(model.forward).parameters


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    if dtype == "auto":
        # On a GPU keep the checkpoint's own dtype. On a CPU use float32, because
        # half-precision matmuls there are slow.
        return "auto" if device.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"invalid dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return resolved
