"""LLM training data: rows → token ids and labels → (packed) sequences → batches.

Rows come from JSONL files (chat ``messages``, prompt + response, or a text column) or plain
text files (one document per blank-line-separated block). Labels are the token ids where the
loss applies and -100 elsewhere: by default only response / assistant tokens (``train_on_prompt``
puts the loss on every token). Sequences longer than ``max_seq_length`` are cut (plain text is
split into chunks instead); a sample left without label tokens is dropped and counted.

Packing (``packing = true``, the default) places whole samples into sequences of at most
``max_seq_length`` tokens, best fit decreasing, once at start-up. Samples never attend to one
another: ``position_ids`` restart at 0 for each sample and no attention mask is passed, from
which transformers builds a block-diagonal causal mask (SDPA / eager) or calls the varlen kernel
(flash-attention). The first token of each sample gets label -100, since the position before it
belongs to another sample. Padding at the end of a batch row is one more such segment.

The epoch order is the one of every family (library/data/sampler.py): sequences are the samples
the global shuffle orders and the processes split.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_left, insort
from dataclasses import dataclass, field
from typing import Any

import torch

from library.data.prompt_templates import CHAT, format_prompt
from library.data.sampler import EpochBatchSampler, derive_seed
from library.data.text_config import TextDatasetConfig, TextDatasetGroup, TextSubsetConfig
from library.data.text_rows import (  # noqa: F401  (check_row, read_rows: tools import them from here)
    RowError,
    _column,
    _messages,
    _system_into_first_user,
    check_row,
    read_rows,
)
from library.errors import UserError

IGNORE_INDEX = -100


@dataclass
class Sample:
    """One tokenised sequence; ``row`` numbers its source row within the dataset (for the validation split)."""

    input_ids: list[int]
    labels: list[int]
    row: int
    subset: int


@dataclass
class SubsetReport:
    """What became of a subset's rows, for the start-up summary and ss_datasets."""

    name: str
    file: str
    format: str
    num_repeats: int
    rows: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"
    truncated: int = 0
    no_labels: int = 0
    longest: int = 0  # tokens of the longest row before cutting, for the "no usable rows" error
    prompt_template: str | None = None

    def describe_format(self) -> str:
        if self.format != "instruct":
            return self.format
        if self.prompt_template is None:
            return "instruct, no prompt_template: prompt and response joined as they are"
        named = self.prompt_template if "{prompt}" not in self.prompt_template else "your text"
        return f"instruct, prompt_template {named}"


# --- tokenising -------------------------------------------------------------------------------


class Tokenise:
    """Turns rows of one subset into (input_ids, labels) with the tokenizer and, for chat, its template."""

    def __init__(self, tokenizer: Any, subset: TextSubsetConfig) -> None:
        self.tok = tokenizer
        self.subset = subset
        # Rows are cut (text: chunked) to max_seq_length here; transformers' "Token indices sequence length is
        # longer than the specified maximum ... will result in indexing errors" (about its model_max_length) would
        # only mislead, so it is marked as already shown.
        if isinstance(getattr(tokenizer, "deprecation_warnings", None), dict):
            tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
        with_special = tokenizer("a", add_special_tokens=True).input_ids
        bos = tokenizer.bos_token_id
        self.prefix = [bos] if bos is not None and with_special and with_special[0] == bos else []
        self.suffix = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.template = subset.chat_template.read_text(encoding="utf-8") if subset.chat_template else None
        chat = subset.format == "chat" or subset.prompt_template == CHAT
        if chat and self.template is None and not getattr(tokenizer, "chat_template", None):
            fix = ('or use prompt_column + response_column' if subset.format == "chat" else
                   'or a text prompt_template such as "alpaca"')
            raise UserError(f"{subset.name}: the tokenizer has no chat template; set chat_template = "
                            f'"template.jinja" (a Jinja file) {fix}.')

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def __call__(self, row: Any) -> tuple[list[int], list[int]]:
        s = self.subset
        if s.format == "text":
            text = row if isinstance(row, str) else _column(row, s.text_column, str)
            ids = self.prefix + self.ids(text) + self.suffix
            return ids, list(ids)
        if s.format == "instruct":
            text = _column(row, s.prompt_column, str)
            extra = row.get(s.input_column) if s.input_column else None
            if extra is not None and not isinstance(extra, str):
                raise RowError(f"column '{s.input_column}' is {type(extra).__name__}, expected str")
            answer = _column(row, s.response_column, str)
            if s.prompt_template == CHAT:
                return self.chat([{"role": "user", "content": format_prompt(None, text, extra)},
                                  {"role": "assistant", "content": answer}])
            prompt = self.prefix + self.ids(format_prompt(s.prompt_template, text, extra))
            response = self.ids(answer) + self.suffix
            prompt_labels = list(prompt) if s.train_on_prompt else [IGNORE_INDEX] * len(prompt)
            return prompt + response, prompt_labels + response
        return self.chat(_messages(row, s.messages_column))

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                chat_template=self.template)
        except Exception as e:  # jinja raises its own errors for templates that reject a conversation
            if messages and messages[0]["role"] == "system" and "system" in str(e).lower():
                # Gemma's template has no system role: its text goes before the first user turn (axolotl and
                # LLaMA-Factory do the same), rather than every such row failing.
                return self.render(_system_into_first_user(messages), generation_prompt)
            raise RowError(f"the chat template failed: {e}") from None

    def chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Labels on the assistant turns: each turn is the text between the conversation rendered up to
        the turn with a generation prompt and rendered through it (so the end-of-turn token is learnt); for a
        template whose renderings are not prefixes of each other, each turn's own text found in order."""
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = self.render(messages[:i], True), self.render(messages[: i + 1])
            if not (full.startswith(through) and through.startswith(before)):
                spans = self._spans_by_content(full, messages)
                break
            if message.get("weight", 1) != 0:  # OpenAI's fine-tuning format: "weight": 0 turns are not learnt
                spans.append((len(before), len(through)))
        encoded = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded.input_ids)
        if self.subset.train_on_prompt:
            return ids, list(ids)
        # A token that overlaps an assistant span carries answer text, so it is learnt even when it starts
        # before the span: with a generation prompt ending in a space ("Assistant: "), the answer's first
        # word is the token " the", which starts on the prompt's space. A zero-width token counts as one
        # character wide.
        labels = [t if any(start < b and max(end, start + 1) > a for a, b in spans) else IGNORE_INDEX
                  for t, (start, end) in zip(ids, encoded.offset_mapping, strict=True)]
        return ids, labels


    def _spans_by_content(self, full: str, messages: list[dict]) -> list[tuple[int, int]]:
        """Assistant spans for templates that render a turn differently once later turns follow it (Qwen3 drops
        reasoning and adds markers to the last turn only, so renderings are not prefixes of each other): each
        message's text is found in order in the full rendering, and an assistant turn's span runs through the
        end-of-turn text the template puts after an assistant message. A turn with reasoning
        (``<think>...</think>answer``) that is not rendered verbatim is found by its parts (:meth:`_reasoning`)."""
        probe = self.render([{"role": "user", "content": "\x01"}, {"role": "assistant", "content": "\x02"}])
        tail = probe[probe.rindex("\x02") + 1:] if "\x02" in probe else ""
        # What opens an assistant turn after a user turn ("<|end|>\n<|assistant|>\n"): skipped before searching,
        # so that a short answer is not found inside it.
        header = probe[probe.index("\x01") + 1:probe.index("\x02")].split("<think>")[0] if "\x02" in probe else ""
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        spans, cursor = [], 0
        for i, message in enumerate(messages):
            content, start_at, learn = message["content"], None, True
            if message["role"] == "assistant" and "</think>" in content and full.find(content, cursor) < 0:
                begin = cursor + len(header) if header and full.startswith(header, cursor) else cursor
                content, cursor, start_at = self._reasoning(full, content, begin, is_last=i == last)
                learn = start_at is not None
            at = full.find(content, cursor)
            if at < 0:
                raise RowError("the chat template changes the text of earlier turns, so the assistant turns cannot "
                               "be located; set train_on_prompt = true for this subset")
            cursor = at + len(content)
            if message["role"] == "assistant":
                end = cursor + len(tail) if tail and full.startswith(tail, cursor) else cursor
                if learn and message.get("weight", 1) != 0:
                    spans.append((at if start_at is None else start_at, end))
                cursor = end
        return spans

    @staticmethod
    def _reasoning(full: str, content: str, begin: int, is_last: bool) -> tuple[str, int, int | None]:
        """(answer, where to search it, where the learnt span starts) for an assistant turn with reasoning.

        Where the template kept the reasoning (Qwen3's last turn, re-rendered as ``<think>\\n...\\n</think>``),
        the span starts at its ``<think>`` and the answer is searched after its ``</think>`` (a reasoning that
        mentions the answer must not be taken for it). Where it dropped it (Qwen3's earlier turns), the turn
        is context, not learnt (None): learning "answer straight after the turn opens" would teach the model to
        skip its reasoning at the very position where it starts it at inference. A template that drops the
        reasoning of the last turn too (DeepSeek-R1's) cannot train it: the row is refused with what to do."""
        reasoning = content.split("</think>")[0].split("<think>")[-1].strip()
        answer = content.split("</think>")[-1].strip()
        opened = full.find("<think>", begin)
        closed = full.find("</think>", opened) if opened >= 0 else -1
        if closed >= 0 and (not reasoning or full.find(reasoning, opened, closed) >= 0):
            return answer, closed + len("</think>"), opened
        if is_last:
            raise RowError("the chat template drops the <think> reasoning of the last assistant turn, so it cannot "
                           "be learnt; give a chat_template that keeps it (chat_template = \"file.jinja\") or "
                           "remove the reasoning from the data")
        return answer, begin, None


def _fit(ids: list[int], labels: list[int], max_len: int, chunk: bool) -> list[tuple[list[int], list[int]]]:
    if len(ids) <= max_len:
        return [(ids, labels)]
    if not chunk:
        return [(ids[:max_len], labels[:max_len])]
    return [(ids[i:i + max_len], labels[i:i + max_len]) for i in range(0, len(ids), max_len)
            if len(ids) - i > 1]  # a 1-token tail has nothing to predict


def tokenise_dataset(config: TextDatasetConfig, tokenizer: Any) -> tuple[list[Sample], list[SubsetReport]]:
    """Every row of every subset as samples (before repeats); bad rows raise or are recorded per on_bad_row."""
    samples: list[Sample] = []
    reports = []
    row_id = 0
    for index, subset in enumerate(config.subsets):
        report = SubsetReport(subset.name, subset.path.name, subset.format, subset.num_repeats,
                              prompt_template=subset.prompt_template)
        tokenise = Tokenise(tokenizer, subset)
        for line, row in read_rows(subset):
            report.rows += 1
            try:
                if isinstance(row, RowError):
                    raise row
                ids, labels = tokenise(row)
            except RowError as e:
                where = f"{subset.path}:{line}: {e}"
                if subset.on_bad_row == "error":
                    raise UserError(f"{where} ({subset.name}; set on_bad_row = \"skip\" to skip such rows)") from None
                report.skipped.append(where)
                continue
            pieces = _fit(ids, labels, config.max_seq_length, chunk=subset.format == "text")
            report.longest = max(report.longest, len(ids))
            report.truncated += subset.format != "text" and len(ids) > config.max_seq_length
            for piece_ids, piece_labels in pieces:
                if all(label == IGNORE_INDEX for label in piece_labels[1:]):
                    report.no_labels += 1
                    continue
                samples.append(Sample(piece_ids, piece_labels, row_id, index))
            row_id += 1
        reports.append(report)
    return samples, reports


# --- packing and batches ----------------------------------------------------------------------


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bins of sample indices, each holding at most ``capacity`` tokens; deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        pos = bisect_left(free, (lengths[i], -1))
        if pos == len(free):
            bins.append([i])
            insort(free, (capacity - lengths[i], len(bins) - 1))
            continue
        room, b = free.pop(pos)
        bins[b].append(i)
        insort(free, (room - lengths[i], b))
    return bins


class TextSequences(torch.utils.data.Dataset):
    """The training sequences of all datasets; keys are (epoch, global sequence index)."""

    def __init__(self, sequences: list[list[Sample]]) -> None:
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        _, index = key
        ids, labels, positions = [], [], []
        for sample in self.sequences[index]:
            ids += sample.input_ids
            labels += [IGNORE_INDEX] + sample.labels[1:]  # its first token is not predicted from another sample
            positions += range(len(sample.input_ids))
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "index": index}


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows padded on the right to the longest; the padding is a segment of its own, never in the loss."""
    width = max(len(item["input_ids"]) for item in items)

    def row(item: dict[str, Any], key: str, fill: int) -> list[int]:
        missing = width - len(item[key])
        return item[key] + (list(range(missing)) if key == "position_ids" else [fill] * missing)

    labels = torch.tensor([row(i, "labels", IGNORE_INDEX) for i in items], dtype=torch.long)
    predicts = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) != IGNORE_INDEX
    return {
        "input_ids": torch.tensor([row(i, "input_ids", pad_id) for i in items], dtype=torch.long),
        "labels": labels,
        "position_ids": torch.tensor([row(i, "position_ids", 0) for i in items], dtype=torch.long),
        "indices": torch.tensor([i["index"] for i in items], dtype=torch.long),
        # tokens in the loss (labels are shifted by one inside the model): the loop weights by them
        "num_label_tokens": int(predicts.sum()),
        # where those predictions are made (flat batch x position indices), found here on the CPU so that the
        # loss selects them on the device without the sync a boolean mask there would cost each micro-step
        "loss_positions": predicts.flatten().nonzero().squeeze(1),
    }


class _Collate:  # a class, not a lambda, so DataLoader workers can pickle it
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate(items, self.pad_id)


def split_validation(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, validation): whole rows held out from each subset alike (``fraction`` of its rows, at least one and
    never all; none from a one-row subset), chosen by a shuffle keyed on ``seed`` and the subset, as image
    subsets are split. A small subset beside a large one keeps its share instead of losing most of its rows."""
    if fraction <= 0:
        return samples, []
    chosen: set[tuple[int, int]] = set()
    for subset in sorted({s.subset for s in samples}):
        rows = sorted({s.row for s in samples if s.subset == subset})
        if len(rows) < 2:
            continue
        random.Random(derive_seed(seed, "validation", subset)).shuffle(rows)
        chosen |= {(subset, row) for row in rows[:min(len(rows) - 1, max(1, round(len(rows) * fraction)))]}
    return ([s for s in samples if (s.subset, s.row) not in chosen],
            [s for s in samples if (s.subset, s.row) in chosen])


# --- the run's data ---------------------------------------------------------------------------


@dataclass
class TextDatasetData:
    config: TextDatasetConfig
    reports: list[SubsetReport]
    train: list[Sample]  # after repeats
    validation: list[Sample]
    sequences: list[list[Sample]]

    def summary(self) -> list[str]:
        c = self.config
        tokens = sum(len(s.input_ids) for s in self.train)
        trained = sum(sum(label != IGNORE_INDEX for label in s.labels[1:]) for s in self.train)
        fill = tokens / max(1, len(self.sequences) * c.max_seq_length)
        lines = [f"{c.name}: {len(self.train)} samples, {tokens} tokens ({trained} in the loss), "
                 f"{len(self.sequences)} sequences of <= {c.max_seq_length} tokens"
                 + (f" packed ({fill:.0%} full)" if c.packing else " (one sample each, no packing)")
                 + f", batch size {c.batch_size}, {len(self.validation)} validation samples"]
        for r in self.reports:
            lines.append(f"  {r.name}: {r.file} ({r.describe_format()}), {r.rows} rows x {r.num_repeats} repeats, "
                         f"{len(r.skipped)} skipped, {r.truncated} cut to max_seq_length, "
                         f"{r.no_labels} dropped without tokens to learn")
            lines += [f"    skipped {where}" for where in r.skipped[:10]]
            if len(r.skipped) > 10:
                lines.append(f"    ... and {len(r.skipped) - 10} more skipped rows")
        return lines


@dataclass
class TextData:
    """What the loop needs (library/families TrainData): a loader whose batches follow ``sampler``'s order."""

    datasets: list[TextDatasetData]
    sampler: EpochBatchSampler
    loader: torch.utils.data.DataLoader
    batch_size: int
    resolution: tuple[int, int]  # (max_seq_length, 1): what ss_resolution records for text
    num_reg_images: int = 0
    validation_loader: torch.utils.data.DataLoader | None = None  # held-out rows, one sample per sequence

    @property
    def num_train_images(self) -> int:
        """Training samples (after repeats); the ss_num_train_images of a text run."""
        return sum(len(d.train) for d in self.datasets)

    def summary(self) -> str:
        return "\n".join(line for d in self.datasets for line in d.summary())

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        return {}

    def content_digest(self) -> str:
        """Changes when any trained token, label or sequence layout changes (compared on resume)."""
        h = hashlib.sha256()
        for d in self.datasets:
            for sequence in d.sequences:
                for s in sequence:
                    h.update(repr((s.input_ids, s.labels)).encode())
                h.update(b"|")
        return h.hexdigest()[:16]

    def metadata(self) -> list[dict[str, Any]]:
        """ss_datasets: per dataset its sequence settings and subsets (file names only, no paths)."""
        return [{
            "max_seq_length": d.config.max_seq_length, "packing": d.config.packing,
            "batch_size_per_device": d.config.batch_size, "num_train_samples": len(d.train),
            "num_sequences": len(d.sequences), "num_validation_samples": len(d.validation),
            "subsets": [{"file": r.file, "format": r.format, "num_repeats": r.num_repeats, "rows": r.rows,
                         "skipped_rows": len(r.skipped)}
                        | ({"prompt_template": r.prompt_template} if r.prompt_template else {}) for r in d.reports],
        } for d in self.datasets]


def _why_unused(subset: TextSubsetConfig, report: SubsetReport, max_seq_length: int) -> str:
    """Why a subset gave no sample, and the fix: this is raised before the summary that lists it is printed."""
    if report.rows == 0:
        return f"{subset.path} is empty (no rows); add rows or remove the subset"
    parts = []
    if report.skipped:
        parts.append(f"{len(report.skipped)} of {report.rows} rows are bad and skipped (first: {report.skipped[0]})")
    if report.truncated:
        count = f"all {report.rows}" if report.truncated == report.rows else f"{report.truncated} of {report.rows}"
        parts.append(f"{count} rows are longer than max_seq_length={max_seq_length} tokens (longest "
                     f"{report.longest}), so no response token is left after the cut: raise max_seq_length or "
                     "shorten the prompts")
    if report.no_labels > report.truncated:
        parts.append(f"{report.no_labels - report.truncated} samples have no token to learn (a single token)")
    return f"{subset.path}: " + ", ".join(parts)


def build_dataset(config: TextDatasetConfig, tokenizer: Any, seed: int) -> TextDatasetData:
    samples, reports = tokenise_dataset(config, tokenizer)
    if not samples:  # checked before the split, which would blame validation_split for it
        why = [_why_unused(s, r, config.max_seq_length) for s, r in zip(config.subsets, reports, strict=True)]
        raise UserError(f"{config.name}: no usable rows: " + "; ".join(why))
    used = {s.subset for s in samples}
    unused = [(subset, report) for i, (subset, report) in enumerate(zip(config.subsets, reports, strict=True))
              if i not in used]
    if unused:  # the run would train on the other subsets alone, while the model card lists this one's format
        why = "; ".join(_why_unused(subset, report, config.max_seq_length) for subset, report in unused)
        raise UserError(f"{', '.join(subset.name for subset, _ in unused)} gave no sample to train on: {why}. "
                        "Fix the rows or remove the subset.")
    train, validation = split_validation(samples, config.validation_split,
                                         config.validation_seed if config.validation_seed is not None else seed)
    repeats = [s for s in train for _ in range(config.subsets[s.subset].num_repeats)]
    if config.packing:
        bins = pack([len(s.input_ids) for s in repeats], config.max_seq_length)
        sequences = [[repeats[i] for i in sorted(b)] for b in bins]
    else:
        sequences = [[s] for s in repeats]
    return TextDatasetData(config, reports, repeats, validation, sequences)


def build_text_data(group: TextDatasetGroup, tokenizer: Any, *, seed: int, num_processes: int,
                    rank: int, accumulation: int = 1) -> TextData:
    """Tokenise and pack every dataset, then the epoch-order sampler for this process and the DataLoader."""
    datasets = [build_dataset(d, tokenizer, seed) for d in group.datasets]
    batch_sizes = {d.config.batch_size for d in datasets}
    if len(batch_sizes) > 1:
        raise UserError(f"{group.source}: datasets with different batch_size ({sorted(batch_sizes)}) are not "
                        "supported yet; use one batch_size for all datasets.")
    sequences = [seq for d in datasets for seq in d.sequences]
    buckets = [i for i, d in enumerate(datasets) for _ in d.sequences]  # a batch never mixes datasets
    batch_size = batch_sizes.pop()
    sampler = EpochBatchSampler(buckets, batch_size, num_processes, rank, seed, accumulation=accumulation)
    pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    # Everything is tokenised in memory already; worker processes would only add start-up time.
    loader = torch.utils.data.DataLoader(TextSequences(sequences), batch_sampler=sampler, collate_fn=_Collate(pad_id),
                                         pin_memory=torch.cuda.is_available())  # async copies to the GPU
    longest = max(d.config.max_seq_length for d in datasets)
    held_out = [[s] for d in datasets for s in d.validation]
    validation = None
    if held_out:
        keys = [(0, i) for i in range(len(held_out))]
        validation = torch.utils.data.DataLoader(
            TextSequences(held_out), batch_sampler=[keys[i:i + batch_size] for i in range(0, len(keys), batch_size)],
            collate_fn=_Collate(pad_id))
    return TextData(datasets, sampler, loader, batch_size, (longest, 1), validation_loader=validation)
