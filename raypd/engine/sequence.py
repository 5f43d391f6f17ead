"""Per-request host state during decode: generated tokens, stop checks and text deltas.

Text is released with a hold-back of (longest stop string - 1) characters, so a stop string
that arrives split over several tokens is never partly sent before it is recognized.
"""

from __future__ import annotations

import dataclasses

from raypd.engine.api import FINISH_LENGTH, FINISH_STOP, Request, TokenOutput


@dataclasses.dataclass
class Sequence:
    request: Request
    pages: list[int]
    prompt_len: int
    eos_ids: tuple[int, ...]
    tokenizer: object | None = None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    _text: str = ""
    _sent: int = 0  # characters of _text already released
    _min_text_len: int = 0  # characters of _text before the min_tokens-th token (a stop string must end after)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def next_position(self) -> int:
        """Position of the last sampled token, which the next decode step feeds."""
        return self.prompt_len + len(self.output_ids) - 1

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def append(self, token: int, logprob: float, top_logprobs: tuple | None = None) -> TokenOutput:
        p = self.request.params
        self.output_ids.append(int(token))
        self.logprobs.append(float(logprob))
        # min_tokens: nothing but the budget ends the request before that many tokens (the
        # sampler masks EOS and the stop ids until then; stop strings must end after it)
        is_short = len(self.output_ids) < p.min_tokens
        is_eos = token in self.eos_ids and not p.ignore_eos
        if (is_eos or token in p.stop_token_ids) and not is_short:
            self.finish_reason = FINISH_STOP
        elif self.tokenizer is not None:
            self._text = self.tokenizer.decode(self.output_ids)
            if len(self.output_ids) == p.min_tokens - 1:
                self._min_text_len = len(self._text)
            for s in p.stop if not is_short else ():
                at = self._text.find(s, max(0, self._min_text_len - len(s) + 1))
                if at >= 0:
                    self._text = self._text[:at]
                    self.finish_reason = FINISH_STOP
        if self.finish_reason is None and len(self.output_ids) >= p.max_tokens:
            self.finish_reason = FINISH_LENGTH
        return TokenOutput(self.request_id, int(token), float(logprob), self.finish_reason, self._release_text(),
                           top_logprobs=top_logprobs)

    def _release_text(self) -> str:
        end = len(self._text)
        if self.finish_reason is None:
            hold = max((len(s) for s in self.request.params.stop), default=1) - 1
            end -= hold
            while end > self._sent and self._text[end - 1] == "\ufffd":  # incomplete UTF-8
                end -= 1
        if end <= self._sent:
            return ""
        delta, self._sent = self._text[self._sent:end], end
        return delta

    @property
    def text(self) -> str:
        return self._text
