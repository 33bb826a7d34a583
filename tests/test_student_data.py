"""Stored rows to student samples: vocabulary mapping, alignment, fallbacks, queries."""

from __future__ import annotations

import json
import math
from itertools import islice
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline.errors import ConfigError, DamagedFileError
from storage.schema import LogprobColumns
from student.data import (
    IGNORE_INDEX,
    RowQuery,
    Sample,
    SampleEncoder,
    StoreSamples,
    collate,
    count_rows,
    is_heldout,
    iter_rows,
)
from student.vocab import (
    SCHEME_BYTE_LEVEL,
    SCHEME_METASPACE,
    StudentVocab,
    detect_piece_scheme,
    piece_to_bytes,
)
from tests.fixtures_student import damage_data_pages, response_row, token_text, write_store

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def vocab(tokenizer) -> StudentVocab:
    return StudentVocab.from_tokenizer(tokenizer, vocab_limit=512)


def piece_id(tokenizer, piece: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(piece)
    assert token_id != tokenizer.unk_token_id, piece
    return token_id


def columns(positions: list[tuple[bytes, float | None, list[tuple[bytes, float | None]]]]) -> LogprobColumns:
    """Build logprob columns from (token bytes, logprob, [(alternative bytes, logprob)])."""
    data = LogprobColumns()
    for token, logprob, alternatives in positions:
        data.tokens.append(token_text(token))
        data.token_bytes.append(token)
        data.token_logprobs.append(logprob)
        data.top_counts.append(len(alternatives))
        for alt_bytes, alt_logprob in alternatives:
            data.top_tokens.append(token_text(alt_bytes) if alt_bytes is not None else "")
            data.top_logprobs.append(alt_logprob)
            data.top_bytes.append(alt_bytes)
    return data


def stored_row(positions, *, prompt: str = PROMPT, prompt_id: str = "p0", sample_index: int = 0, **extra):
    """A row as the store returns it: nested lists of dicts, as DuckDB gives them to Python."""
    data = columns(positions) if positions is not None else None
    response = b"".join(token for token, _, _ in positions).decode() if positions else ""
    row = response_row(prompt_id, prompt, sample_index, data, extra.pop("response", response), **extra)
    if data is not None:
        row["tokens"] = data.tokens
        row["token_bytes"] = data.token_bytes
        row["token_logprobs"] = data.token_logprobs
        row["top_logprobs"] = [
            [{"token": t, "logprob": lp, "bytes": b} for t, lp, b in data.alternatives(i)]
            for i in range(len(data))
        ]
    return row


def encoder_for(tokenizer, vocab, **kwargs) -> SampleEncoder:
    kwargs.setdefault("max_seq_len", 64)
    return SampleEncoder(tokenizer, vocab, **kwargs)


# Vocabulary mapping ----------------------------------------------------------------


def test_vocab_maps_sentencepiece_pieces(tokenizer, vocab) -> None:
    assert detect_piece_scheme(tokenizer) == SCHEME_METASPACE
    assert vocab.lookup(b" there") == piece_id(tokenizer, "\u2581there")
    assert vocab.lookup(b",") == piece_id(tokenizer, ",")
    assert vocab.lookup(b"\n") == piece_id(tokenizer, "<0x0A>")
    # An ordinary piece wins over the byte-fallback piece with the same bytes.
    assert vocab.lookup(b" ") == piece_id(tokenizer, "\u2581")
    assert vocab.lookup(b" ") != piece_id(tokenizer, "<0x20>")


def test_vocab_never_maps_special_tokens(vocab) -> None:
    assert vocab.lookup(b"<s>") is None
    assert vocab.lookup(b"</s>") is None
    assert vocab.lookup(b"<unk>") is None
    assert vocab.lookup(b"") is None
    assert vocab.lookup(None) is None


def test_vocab_maps_plain_added_token(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.add_tokens(["<think>"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    vocab = StudentVocab.from_tokenizer(tokenizer)
    assert vocab.lookup(b"<think>") == tokenizer.convert_tokens_to_ids("<think>")
    assert vocab.lookup(b"<|im_end|>") is None


def test_vocab_maps_emoji_byte_pieces(tokenizer, vocab) -> None:
    emoji = "\U0001F60A".encode()
    assert emoji == b"\xf0\x9f\x98\x8a"
    expected = [piece_id(tokenizer, f"<0x{byte:02X}>") for byte in emoji]
    assert [vocab.lookup(bytes([byte])) for byte in emoji] == expected
    # The whole emoji is four student tokens, so as one teacher token it does not map.
    assert vocab.lookup(emoji) is None


def test_vocab_multi_token_word_unmapped(tokenizer, vocab) -> None:
    assert len(tokenizer(" unbelievable", add_special_tokens=False).input_ids) > 1
    assert vocab.lookup(b" unbelievable") is None


def test_vocab_limit_drops_wider_ids(tokenizer) -> None:
    narrow = StudentVocab.from_tokenizer(tokenizer, vocab_limit=300)
    assert piece_id(tokenizer, "\u2581there") >= 300
    assert narrow.lookup(b" there") is None
    assert narrow.pieces_beyond_limit == 512 - 300
    assert max(narrow.ids_by_bytes.values()) < 300


def test_vocab_wider_logits_change_nothing(tokenizer, vocab) -> None:
    # A student whose logits are padded beyond its tokenizer maps the same ids.
    wide = StudentVocab.from_tokenizer(tokenizer, vocab_limit=520)
    assert wide.ids_by_bytes == vocab.ids_by_bytes


def test_teacher_padding_ids_never_map(tokenizer, vocab) -> None:
    # A teacher with a wider vocabulary can return its padding ids as alternatives: they
    # come without bytes or as placeholder text, and neither matches a student piece.
    row = stored_row([(b" there", -0.2, [(b" there", -0.2), (None, -7.0), (b"<pad_515>", -8.0)])])
    encoder = encoder_for(tokenizer, vocab)
    sample = encoder.encode(row)
    assert sample.token_level
    ids, _ = sample.teacher[len(prompt_ids(tokenizer)) - 1]
    assert ids == [piece_id(tokenizer, "\u2581there")]
    assert encoder.stats.alternatives_mapped == 1
    assert max(ids) < 512


@pytest.mark.parametrize(
    ("piece", "scheme", "expected"),
    [
        ("\u2581the", SCHEME_METASPACE, b" the"),
        ("<0xE2>", SCHEME_METASPACE, b"\xe2"),
        ("<0x0a>", SCHEME_METASPACE, b"\n"),
        ("ing", SCHEME_METASPACE, b"ing"),
        ("\u0120the", SCHEME_BYTE_LEVEL, b" the"),
        ("\u010a", SCHEME_BYTE_LEVEL, b"\n"),
        ("\u00c3\u00a9", SCHEME_BYTE_LEVEL, "\u00e9".encode()),
        ("\u2581x", SCHEME_BYTE_LEVEL, None),
    ],
)
def test_piece_to_bytes_cases(piece: str, scheme: str, expected: bytes | None) -> None:
    assert piece_to_bytes(piece, scheme) == expected


def test_byte_level_tokenizer_mapping() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|end|>"]
    )
    corpus = ["the cat sat on the mat", "the caf\u00e9 was open", "then the cat left"] * 20
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>")

    assert detect_piece_scheme(tokenizer) == SCHEME_BYTE_LEVEL
    vocab = StudentVocab.from_tokenizer(tokenizer)
    text = "the caf\u00e9 sat"
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert len(encoding.input_ids) > 1
    for token_id in encoding.input_ids:
        data = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)]).encode()
        if data.decode("utf-8", errors="replace") != "\ufffd":
            assert vocab.lookup(data) == token_id
    assert vocab.lookup(b" the") == tokenizer.convert_tokens_to_ids("\u0120the")
    assert vocab.lookup(b"<|end|>") is None


# Encoding samples ------------------------------------------------------------------


def prompt_ids(tokenizer, prompt: str = PROMPT) -> list[int]:
    return list(tokenizer(prompt).input_ids)


def test_token_level_sample_aligns_targets(tokenizer, vocab) -> None:
    comma, there, was = (piece_id(tokenizer, p) for p in (",", "\u2581there", "\u2581was"))
    row = stored_row([
        (b",", -0.1, [(b",", -0.1), (b" and", -2.5)]),
        (b" there", -0.2, [(b" there", -0.2), (b" she", -1.9)]),
        (b" was", -0.05, [(b" was", -0.05)]),
    ])
    sample = encoder_for(tokenizer, vocab).encode(row)
    start = len(prompt_ids(tokenizer)) - 1

    assert sample.token_level
    assert sample.input_ids == prompt_ids(tokenizer) + [comma, there]
    assert sample.target_ids == [IGNORE_INDEX] * start + [comma, there, was]
    assert sample.teacher[start] == ([comma, piece_id(tokenizer, "\u2581and")], [-0.1, -2.5])
    assert sample.teacher[start + 1][0] == [there, piece_id(tokenizer, "\u2581she")]
    assert sample.teacher[start + 2] == ([was], [-0.05])
    assert sample.teacher_top1 == {start: comma, start + 1: there, start + 2: was}


def test_null_first_logprob_keeps_alignment(tokenizer, vocab) -> None:
    # Echo-style scoring: the first token has no logprob and no alternatives.
    comma, there, was = (piece_id(tokenizer, p) for p in (",", "\u2581there", "\u2581was"))
    she = piece_id(tokenizer, "\u2581she")
    row = stored_row([
        (b",", None, []),
        (b" there", -4.10, [(b" she", -0.3)]),
        (b" was", -2.3, [(b" he", -0.4)]),
    ])
    sample = encoder_for(tokenizer, vocab).encode(row)
    start = len(prompt_ids(tokenizer)) - 1

    # Every target stays at its own position: nothing is shifted by the missing value.
    assert sample.target_ids[start:] == [comma, there, was]
    assert start not in sample.teacher
    ids, logprobs = sample.teacher[start + 1]
    assert ids == [she, there]
    assert logprobs == pytest.approx([-0.3, -4.10])
    ids, logprobs = sample.teacher[start + 2]
    assert ids == [piece_id(tokenizer, "\u2581he"), was]
    assert logprobs == pytest.approx([-0.4, -2.3])


def test_position_without_mapped_alternatives_has_no_distribution(tokenizer, vocab) -> None:
    row = stored_row([
        (b" there", -0.2, []),
        (b" was", -0.1, [(b" unbelievable", -0.05)]),
    ])
    sample = encoder_for(tokenizer, vocab).encode(row)
    start = len(prompt_ids(tokenizer)) - 1
    assert sample.teacher == {}
    # The teacher's most likely alternative is known but does not map: no top-1 either.
    assert sample.teacher_top1 == {}
    assert sample.target_ids[start:] == [piece_id(tokenizer, "\u2581there"), piece_id(tokenizer, "\u2581was")]


def test_unmapped_and_masked_alternatives_dropped(tokenizer, vocab) -> None:
    row = stored_row([
        (b" there", -0.5, [
            (b" there", -0.5),
            (b" unbelievable", -1.0),
            (b" she", None),
            (b" he", -1.5),
        ]),
    ])
    encoder = encoder_for(tokenizer, vocab)
    sample = encoder.encode(row)
    start = len(prompt_ids(tokenizer)) - 1

    ids, logprobs = sample.teacher[start]
    assert ids == [piece_id(tokenizer, "\u2581there"), piece_id(tokenizer, "\u2581he")]
    assert logprobs == pytest.approx([-0.5, -1.5])
    stats = encoder.stats
    assert stats.alternatives_total == 4
    assert stats.alternatives_masked == 1
    assert stats.alternatives_mapped == 2
    assert stats.mapped_alternative_share == pytest.approx(2 / 3)


def test_unmapped_top1_excluded_from_agreement(tokenizer, vocab) -> None:
    row = stored_row([(b" there", -1.2, [(b" unbelievable", -0.4), (b" there", -1.2)])])
    sample = encoder_for(tokenizer, vocab).encode(row)
    start = len(prompt_ids(tokenizer)) - 1
    assert start not in sample.teacher_top1
    assert sample.teacher[start][0] == [piece_id(tokenizer, "\u2581there")]


def test_duplicate_alternative_bytes_merged(tokenizer, vocab) -> None:
    row = stored_row([(b" there", -1.0, [(b" there", -1.0), (b" there", -2.0)])])
    sample = encoder_for(tokenizer, vocab).encode(row)
    ids, logprobs = sample.teacher[len(prompt_ids(tokenizer)) - 1]
    assert ids == [piece_id(tokenizer, "\u2581there")]
    assert logprobs[0] == pytest.approx(math.log(math.exp(-1.0) + math.exp(-2.0)))


def test_emoji_byte_tokens_stay_token_level(tokenizer, vocab) -> None:
    emoji = "\U0001F60A".encode()
    row = stored_row([(b" ", -0.1, [])] + [(bytes([b]), -0.01, [(bytes([b]), -0.01)]) for b in emoji])
    sample = encoder_for(tokenizer, vocab).encode(row)
    assert sample.token_level
    byte_ids = [piece_id(tokenizer, f"<0x{b:02X}>") for b in emoji]
    assert [t for t in sample.target_ids if t != IGNORE_INDEX] == [piece_id(tokenizer, "\u2581")] + byte_ids


def test_multi_token_response_falls_back(tokenizer, vocab) -> None:
    row = stored_row([(b" unbelievable", -0.3, [(b" unbelievable", -0.3)]), (b"!", -0.1, [])])
    encoder = encoder_for(tokenizer, vocab)
    sample = encoder.encode(row)

    assert not sample.token_level
    assert sample.teacher == {}
    full = tokenizer(PROMPT + " unbelievable!").input_ids
    prompt_length = len(prompt_ids(tokenizer))
    assert full[:prompt_length] == prompt_ids(tokenizer)
    assert [t for t in sample.target_ids if t != IGNORE_INDEX] == full[prompt_length:]
    assert encoder.stats.fallback_reasons == {"unmapped_token": 1}
    assert encoder.stats.mapped_position_share == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"logprobs_lossy": True}, "lossy"),
        ({"token_level_ok": False}, "not_token_level_ok"),
        ({"response": " there was"}, "token_bytes_mismatch"),
    ],
)
def test_unusable_logprobs_fall_back(tokenizer, vocab, overrides: dict, reason: str) -> None:
    row = stored_row([(b" there", -0.2, [(b" there", -0.2)])], **overrides)
    encoder = encoder_for(tokenizer, vocab)
    sample = encoder.encode(row)
    assert not sample.token_level
    assert sample.num_targets > 0
    assert encoder.stats.fallback_reasons == {reason: 1}


def test_row_without_logprobs_falls_back(tokenizer, vocab) -> None:
    row = stored_row(None, response=" there was a cat.")
    encoder = encoder_for(tokenizer, vocab)
    sample = encoder.encode(row)
    assert not sample.token_level
    assert sample.num_targets == len(tokenizer(PROMPT + " there was a cat.").input_ids) - len(prompt_ids(tokenizer))
    assert encoder.stats.fallback_reasons == {"no_logprobs": 1}


def test_prompt_filling_context_counted(tokenizer, vocab) -> None:
    long_prompt = " ".join(["Once upon a time"] * 20)
    row = stored_row([(b" there", -0.2, [])], prompt=long_prompt)
    encoder = encoder_for(tokenizer, vocab, max_seq_len=16)
    assert encoder.encode(row) is None
    assert encoder.stats.rows_without_targets == 1
    assert encoder.stats.rows_truncated == 1
    assert "without_targets 1" in encoder.stats.summary()


def test_long_response_truncated_at_end(tokenizer, vocab) -> None:
    row = stored_row([(b" there", -0.2, [])] * 30)
    sample = encoder_for(tokenizer, vocab, max_seq_len=10).encode(row)
    assert len(sample.input_ids) == 10
    assert len(sample.target_ids) == 10


def test_eos_appended_only_after_stop(tokenizer, vocab) -> None:
    positions = [(b" there", -0.2, [(b" there", -0.2)])]
    encoder = encoder_for(tokenizer, vocab, append_eos=True)
    stopped = encoder.encode(stored_row(positions))
    cut = encoder.encode(stored_row(positions, finish_reason="length"))

    assert stopped.target_ids[-1] == tokenizer.eos_token_id
    assert len(stopped.target_ids) - 1 not in stopped.teacher
    assert cut.target_ids[-1] == piece_id(tokenizer, "\u2581there")


def test_messages_without_template_joined(tokenizer, vocab) -> None:
    messages = json.dumps([{"role": "system", "content": "Be kind."}, {"role": "user", "content": PROMPT}])
    row = stored_row([(b",", -0.1, [])], prompt=None, messages=messages)
    sample = encoder_for(tokenizer, vocab).encode(row)
    expected_prompt = list(tokenizer("Be kind.\n" + PROMPT).input_ids)
    assert sample.input_ids == expected_prompt


def test_invalid_messages_counted(tokenizer, vocab) -> None:
    row = stored_row([(b",", -0.1, [])], prompt=None, messages="{not json")
    encoder = encoder_for(tokenizer, vocab)
    assert encoder.encode(row) is None
    assert encoder.stats.rows_invalid == 1


# Collating ------------------------------------------------------------------------


def test_collate_pads_variable_topk() -> None:
    samples = [
        Sample("a", [1, 5, 6], [IGNORE_INDEX, 6, 7], True, {1: ([6, 8, 9], [-0.1, -2, -3]), 2: ([7], [-0.5])}),
        Sample("b", [1, 5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9], False),
    ]
    batch = collate(samples, pad_id=0, vocab_size=16)

    assert batch.input_ids.tolist() == [[1, 5, 6, 0, 0], [1, 5, 6, 7, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.rows.tolist() == [1, 2, 7, 8, 9]
    assert batch.target_ids.tolist() == [6, 7, 7, 8, 9]
    assert batch.teacher_ids.shape == (5, 3)
    assert batch.teacher_mask.sum(dim=1).tolist() == [3, 1, 0, 0, 0]
    assert batch.teacher_ids[1].tolist() == [7, 0, 0]
    assert batch.num_kl_positions == 2
    assert batch.num_input_tokens == 8


def test_collate_rejects_id_beyond_vocab() -> None:
    sample = Sample("a", [1, 5], [IGNORE_INDEX, 5], True, {1: ([5, 600], [-0.1, -2.0])})
    with pytest.raises(ValueError, match="600 is outside the student's 512 logits"):
        collate([sample], pad_id=0, vocab_size=512)


# Reading the store ----------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory) -> Path:
    positions = [(b" there", -0.2, [(b" there", -0.2)])]
    rows = []
    for prompt in range(12):
        for sample_index in range(3):
            rows.append(stored_row(positions, prompt_id=f"p{prompt}", sample_index=sample_index))
    rows.append(stored_row(positions, prompt_id="cut", finish_reason="length"))
    rows.append(stored_row(None, prompt_id="filtered", response=None, finish_reason="content_filter"))
    rows.append(stored_row(positions, prompt_id="unknown", finish_reason=None))
    return write_store(tmp_path_factory.mktemp("store"), rows)


def test_default_query_excludes_unfinished(mixed_store: Path) -> None:
    assert count_rows(RowQuery(mixed_store)) == 36
    assert count_rows(RowQuery(mixed_store, include_truncated=True)) == 37
    # A predicate that names finish_reason replaces the default filter ...
    assert count_rows(RowQuery(mixed_store, where="finish_reason = 'length'")) == 1
    # ... but a response that is NULL (content filtered) is never read.
    assert count_rows(RowQuery(mixed_store, where="finish_reason = 'content_filter'")) == 0
    assert count_rows(RowQuery(mixed_store, where="prompt_id = 'p3'")) == 3


def test_holdout_split_partitions_by_prompt(mixed_store: Path) -> None:
    def prompts(split: str) -> list[str]:
        query = RowQuery(mixed_store, split=split, holdout_fraction=0.3)
        return [row["prompt_id"] for row in iter_rows(query)]

    heldout, train = prompts("heldout"), prompts("train")
    assert sorted(heldout + train) == sorted(prompts("all"))
    assert set(heldout).isdisjoint(train)
    assert heldout and train
    assert all(heldout.count(p) == 3 for p in set(heldout))
    assert set(heldout) == {f"p{i}" for i in range(12) if is_heldout(f"p{i}", 0.3)}


def test_iter_rows_streams_in_chunks(mixed_store: Path) -> None:
    query = RowQuery(mixed_store, order_seed=1)
    small = [row["request_id"] for row in iter_rows(query, rows_per_chunk=5)]
    large = [row["request_id"] for row in iter_rows(query, rows_per_chunk=1000)]
    other = [row["request_id"] for row in iter_rows(RowQuery(mixed_store, order_seed=2))]
    assert small == large
    assert len(small) == 36
    assert sorted(other) == sorted(small)
    assert other != small


def test_invalid_where_names_flag(mixed_store: Path) -> None:
    with pytest.raises(ConfigError, match="--where"):
        count_rows(RowQuery(mixed_store, where="no_such_column = 1"))


def test_where_cannot_escape_filters(mixed_store: Path, monkeypatch) -> None:
    escape = "finish_reason = 'length') OR (1=1"
    with pytest.raises(ConfigError, match="not a single SQL predicate"):
        count_rows(RowQuery(mixed_store, where=escape))

    # Even with the text check off, the nesting keeps the split and response filters.
    monkeypatch.setattr("student.data.check_where", lambda where: None)
    heldout = {f"p{i}" for i in range(12) if is_heldout(f"p{i}", 0.3)}
    query = RowQuery(mixed_store, split="train", holdout_fraction=0.3, where=escape)
    read = {row["prompt_id"] for row in iter_rows(query)}
    assert read
    assert read.isdisjoint(heldout)
    assert "filtered" not in read


@pytest.mark.parametrize(
    "where",
    [
        "true)) AS r UNION ALL SELECT * FROM responses WHERE ((true",
        "prompt_id = 'p1' -- ",
        "prompt_id = 'p1' /* x */",
        "true; SELECT 1",
        "prompt_id = 'p1')",
        "(prompt_id = 'p1'",
        "[1",
    ],
)
def test_where_rejects_unbalanced_text(mixed_store: Path, where: str) -> None:
    with pytest.raises(ConfigError, match="--where"):
        count_rows(RowQuery(mixed_store, where=where))


def test_where_brackets_inside_strings_accepted(mixed_store: Path) -> None:
    assert count_rows(RowQuery(mixed_store, where="prompt_id <> ')(' AND (prompt_id = 'p1')")) == 3


def test_where_never_reads_heldout_rows(mixed_store: Path) -> None:
    heldout = {f"p{i}" for i in range(12) if is_heldout(f"p{i}", 0.3)}
    assert heldout
    query = RowQuery(mixed_store, split="train", holdout_fraction=0.3, where="true OR (1=1)")
    read = {row["prompt_id"] for row in iter_rows(query)}
    assert read
    assert read.isdisjoint(heldout)
    assert "filtered" not in read
    # A where clause that reads every finish_reason still keeps NULL responses out.
    everything = RowQuery(mixed_store, split="train", holdout_fraction=0.3, where="finish_reason IS NULL OR true")
    read_all = {row["prompt_id"] for row in iter_rows(everything)}
    assert read_all.isdisjoint(heldout)
    assert "filtered" not in read_all


def test_damaged_page_names_check_fix(tmp_path: Path) -> None:
    positions = [(b" there", -0.2, [(b" there", -0.2)])]
    rows = [stored_row(positions, prompt_id=f"p{i}", response=f"text {i} " * 40) for i in range(40)]
    root = write_store(tmp_path / "store", rows)
    part = next((root / "responses").glob("*.parquet"))
    damage_data_pages(part)
    with pytest.raises(DamagedFileError) as raised:
        list(iter_rows(RowQuery(root)))
    message = str(raised.value)
    assert f"pipeline check --store {root} --deep" in message
    assert part.name in message


def test_store_samples_cursor_and_epochs(mixed_store: Path, tokenizer, vocab) -> None:
    query = RowQuery(mixed_store, where="prompt_id IN ('p0', 'p1')")
    stream = StoreSamples(query, encoder_for(tokenizer, vocab), seed=0, rows_per_chunk=4)
    samples = list(islice(stream, 14))

    assert len(samples) == 14
    assert stream.cursor == {"epoch": 2, "rows_read_in_epoch": 2}
    assert [s.request_id for s in samples[:6]] != [s.request_id for s in samples[6:12]]
    assert sorted(s.request_id for s in samples[:6]) == sorted(s.request_id for s in samples[6:12])
    # Statistics describe one pass over the data.
    assert stream.stats.rows_read == 6



def test_store_samples_resume_from_cursor(mixed_store: Path, tokenizer, vocab) -> None:
    query = RowQuery(mixed_store, where="prompt_id IN ('p0', 'p1')")
    epoch = StoreSamples(query, encoder_for(tokenizer, vocab), seed=0, epoch=2)
    full_pass = [s.request_id for s in islice(epoch, 6)]
    resumed = StoreSamples(query, encoder_for(tokenizer, vocab), seed=0, epoch=2, rows_read_in_epoch=2)
    assert [s.request_id for s in islice(resumed, 4)] == full_pass[2:]


def test_store_samples_without_rows_raises(mixed_store: Path, tokenizer, vocab) -> None:
    query = RowQuery(mixed_store, where="prompt_id = 'nobody'")
    stream = StoreSamples(query, encoder_for(tokenizer, vocab), seed=0)
    with pytest.raises(ConfigError, match="no rows"):
        next(iter(stream))
