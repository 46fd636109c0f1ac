"""Turning a task's prompt into the exact text the model reads: the model's own chat template, or plain.

The paper's reference code puts the whole few-shot prompt in ONE user turn, then opens the assistant
turn and writes the answer cue into it ("The answer is:" for MMLU, "Answer:" for GSM, "A:" for BBH),
joined with a space unless the text already ends in a newline or space. Plain format (base models,
or `--format plain`) is BOS + the prompt + the task's plain cue. Texts carry BOS as text and are
tokenized with add_special_tokens=False, so BOS appears exactly once whatever the tokenizer does.
"""

from __future__ import annotations

from qtulu.errors import QtuluError


class PromptFormat:
    def __init__(self, tokenizer, fmt: str = "chat"):
        if fmt not in ("chat", "plain"):
            raise QtuluError(f"--format: '{fmt}' is not chat or plain", 2)
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.fmt = fmt if self.has_template else "plain"
        self.note = None
        if fmt == "chat" and not self.has_template:
            self.note = (
                "the model's tokenizer has no chat template: prompts use the paper's plain format "
                "(no <|user|>/<|assistant|> turns)"
            )

    @property
    def bos(self) -> str:
        return self.tokenizer.bos_token or ""

    def build(self, content: str, chat_cue: str, plain_cue: str) -> str:
        if self.fmt == "plain":
            return self.bos + content + plain_cue
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        if not chat_cue:
            return text
        return text + chat_cue if text[-1] in ("\n", " ") else text + " " + chat_cue

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def truncate(self, text: str, max_tokens: int) -> str:
        """The text cut to its first max_tokens tokens (TydiQA's passage limit)."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) <= max_tokens:
            return text
        return self.tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)

    def stops(self) -> list[str]:
        """Stop strings every chat generation gets: the next turn's headers."""
        return ["<|user|>", "<|assistant|>"] if self.fmt == "chat" else []
