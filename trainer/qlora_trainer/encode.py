"""Samples -> token ids and labels (the loss mask), built here rather than inside TRL.

Why here: the loss mask must hold for every format and tokenizer, and two details
are easy to get wrong downstream:

* The final EOS of every example is a target. Labels are built explicitly (``-100``
  where no loss is taken), so a tokenizer whose pad token equals its EOS (SmolLM2:
  ``<|im_end|>``) cannot mask the EOS as "padding": TRL's collator pads ``labels``
  with ``-100`` and never derives them from the pad id when a ``labels`` column exists.
* Rows longer than ``max_length`` are cut from the right; a row left without any
  target token (its answer truncated away) is dropped and counted, never trained on
  as a prompt-only example.

How targets are found: the sample is rendered to one string with the character spans
that are trained on (assistant turns, the completion, or all of a text), then
tokenized once with offsets; a token is a target when its characters overlap a span.
For chat, the span of assistant turn ``i`` runs from the end of the template rendered
for turns ``[0, i)`` with the generation prompt to the end of turns ``[0, i]``: this
works for any template that renders conversations prefix by prefix (checked; the
error names the fix). Trailing whitespace after the last EOS is dropped, so every
example ends with EOS; if a template does not end with EOS, the EOS id is appended.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import ChatTemplate, ConfigError
from .data import Message, Sample
from .templates import NAMED

#: Label value that takes no loss (PyTorch cross-entropy ``ignore_index``).
IGNORE = -100


@dataclass
class EncodeStats:
    """Counts for the manifest: ``examples`` kept, ``truncated`` (cut but kept),
    ``droppedTruncated`` (no target left after the cut), tokens and target tokens kept."""

    examples: int = 0
    truncated: int = 0
    dropped_truncated: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "examples": self.examples,
            "truncated": self.truncated,
            "droppedTruncated": self.dropped_truncated,
            "tokens": self.tokens,
            "targetTokens": self.target_tokens,
        }


@dataclass(frozen=True)
class Rendered:
    """A sample as one string: ``spans`` are ``[start, end)`` character ranges that are targets."""

    text: str
    spans: tuple[tuple[int, int], ...]
    add_special_tokens: bool


@dataclass
class Encoded:
    """Tokenized examples, parallel lists: ``input_ids[i]`` and ``labels[i]`` have equal length."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    stats: EncodeStats = field(default_factory=EncodeStats)

    def to_dataset(self) -> Any:
        """A ``datasets.Dataset`` with int32 ``input_ids`` and ``labels`` columns (types explicit, never inferred)."""
        from datasets import Dataset, Features, Sequence, Value

        features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))})
        return Dataset.from_dict({"input_ids": self.input_ids, "labels": self.labels}, features=features)


class Encoder:
    """Turns :class:`~qlora_trainer.data.Sample` rows into ``input_ids`` + ``labels``.

    Args:
        tokenizer: a Hugging Face tokenizer (fast ones give offsets; others are
            tokenized segment by segment).
        max_length: longest sequence in tokens (``training.maxSeqLength``).
        chat_template: ``tokenizer`` (the model's own) or a name in :data:`templates.NAMED`.
        completions_only: loss on completions / assistant turns only (else on every token).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int,
        chat_template: ChatTemplate | str = ChatTemplate.tokenizer,
        completions_only: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.completions_only = completions_only
        name = ChatTemplate(chat_template).value
        self.template: str | None = NAMED.get(name)
        self.template_name = name
        if tokenizer.eos_token_id is None:
            raise ConfigError("the model's tokenizer has no EOS token: the trainer needs one to end every example")
        self.eos_id: int = int(tokenizer.eos_token_id)
        self.eos: str = str(tokenizer.eos_token)
        self._fast = bool(getattr(tokenizer, "is_fast", False))

    # ------------------------------------------------------------------ render
    def _chat(self, messages: Sequence[Message], *, generation_prompt: bool) -> str:
        if self.template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                "dataset.chatTemplate is tokenizer but the model's tokenizer has no chat template: "
                "set dataset.chatTemplate to chatml, llama2 or alpaca"
            )
        return self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    def render(self, sample: Sample) -> Rendered:
        """The string a sample trains on and its target spans (see the module docstring).

        Raises:
            ConfigError: the chat template does not render conversations prefix by prefix,
                or there is no template (both name ``dataset.chatTemplate``).
        """
        if sample.text is not None:
            return Rendered(sample.text, ((0, len(sample.text)),), True)
        if sample.completion is not None:
            prompt = sample.prompt or ""
            text = prompt + sample.completion
            return Rendered(text, ((len(prompt), len(text)),), True)
        assert sample.messages is not None
        messages = sample.messages
        full = self._chat(messages, generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message.role != "assistant" or i < sample.n_prompt_messages:
                continue
            before = self._chat(messages[:i], generation_prompt=True) if i else ""
            through = self._chat(messages[: i + 1], generation_prompt=False)
            if not (through.startswith(before) and full.startswith(through)):
                raise ConfigError(
                    f"dataset.chatTemplate {self.template_name}: the template does not render a conversation "
                    f"prefix by prefix (seen at {sample.origin}), so assistant turns cannot be located: "
                    "set dataset.chatTemplate to chatml, llama2 or alpaca"
                )
            spans.append((len(before), len(through)))
        # End on the EOS: drop whitespace the template puts after the final end-of-turn token.
        stripped = full.rstrip()
        if stripped.endswith(self.eos):
            full = stripped
            spans = [(a, min(b, len(full))) for a, b in spans]
        return Rendered(full, tuple(spans), False)

    # ------------------------------------------------------------------ tokenize
    def _tokenize(self, rendered: Rendered) -> tuple[list[int], list[bool]]:
        """Token ids and, per token, whether it overlaps a target span."""
        spans = rendered.spans
        if self._fast:
            enc = self.tokenizer(
                rendered.text,
                add_special_tokens=rendered.add_special_tokens,
                return_offsets_mapping=True,
            )
            ids = list(enc["input_ids"])
            targets = [e > s and any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
            return ids, targets
        # Slow tokenizers have no offsets: tokenize the pieces between span edges separately.
        edges = sorted({0, len(rendered.text), *[p for span in spans for p in span]})
        ids, targets = [], []
        for a, b in zip(edges, edges[1:], strict=False):
            piece = self.tokenizer(rendered.text[a:b], add_special_tokens=False)["input_ids"]
            is_target = any(a >= s and b <= e for s, e in spans)
            ids += piece
            targets += [is_target] * len(piece)
        if rendered.add_special_tokens:
            prefix = self.tokenizer("", add_special_tokens=True)["input_ids"]
            prefix = [t for t in prefix if t != self.eos_id]
            ids, targets = prefix + ids, [False] * len(prefix) + targets
        return ids, targets

    def encode_one(self, sample: Sample) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one sample, untruncated; the final EOS is always a target."""
        ids, targets = self._tokenize(self.render(sample))
        if not self.completions_only:
            targets = [True] * len(ids)
        if not ids or ids[-1] != self.eos_id:
            ids.append(self.eos_id)
            targets.append(True)
        else:
            targets[-1] = True
        labels = [t if is_target else IGNORE for t, is_target in zip(ids, targets, strict=True)]
        return ids, labels

    def encode(self, samples: Iterable[Sample]) -> Encoded:
        """Encode every sample, truncating to ``max_length``; counts in ``Encoded.stats``."""
        out = Encoded()
        stats = out.stats
        for sample in samples:
            ids, labels = self.encode_one(sample)
            if len(ids) > self.max_length:
                ids, labels = ids[: self.max_length], labels[: self.max_length]
                if all(label == IGNORE for label in labels):
                    stats.dropped_truncated += 1
                    continue
                stats.truncated += 1
            out.input_ids.append(ids)
            out.labels.append(labels)
            stats.examples += 1
            stats.tokens += len(ids)
            stats.target_tokens += sum(label != IGNORE for label in labels)
        return out
