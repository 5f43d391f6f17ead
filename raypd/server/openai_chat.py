"""Chat templates: messages -> prompt text, with the Jinja template a checkpoint ships.

A Hugging Face checkpoint keeps its template in `tokenizer_config.json` ("chat_template": a
string, or a list of {"name", "template"} of which "default" is used), next to `bos_token` and
`eos_token`. `--chat-template FILE` (or `chat_template=` of `raypd.openai_app`) overrides it.
Templates are rendered in Jinja's sandbox (a checkpoint's template is code from elsewhere) with
the variables Hugging Face templates expect: `messages`, `add_generation_prompt`, `bos_token`,
`eos_token`, and the `raise_exception` function.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

NO_TEMPLATE = ("this model has no chat template (no chat_template in its tokenizer_config.json); start the "
               "server with --chat-template FILE (a Jinja template over messages, add_generation_prompt, "
               "bos_token, eos_token), or use /v1/completions")


def model_dir(source) -> Path | None:
    """The directory a model was loaded from (`models.load(source)`), or None (a preset)."""
    import models

    if source is None:
        source = models.DEFAULT_MODEL
    path = Path(source)
    if isinstance(source, str) and not path.exists() and (models.DATA_DIR / source).is_dir():
        path = models.DATA_DIR / source
    return path if path.is_dir() else None


def _token_text(v) -> str:
    if isinstance(v, dict):  # {"content": "<s>", "lstrip": ..., ...}
        v = v.get("content")
    return v if isinstance(v, str) else ""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    source: str  # the Jinja text
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def find(cls, directory: Path | None, override: str | Path | None = None) -> "ChatTemplate | None":
        """The override file's template, else the checkpoint's, else None."""
        config = {}
        if directory is not None and (directory / "tokenizer_config.json").exists():
            config = json.loads((directory / "tokenizer_config.json").read_text())
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        if override is not None:
            path = Path(override)
            if not path.is_file():
                raise ValueError(f"chat_template: {override} is not a file")
            return cls(path.read_text(), bos, eos)
        template = config.get("chat_template")
        if isinstance(template, list):
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return cls(template, bos, eos) if isinstance(template, str) and template else None

    def __post_init__(self):
        import jinja2

        try:
            _environment().parse(self.source)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat_template: not a valid Jinja template: {e}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text; ValueError("messages: ...") when the template refuses the messages."""
        import jinja2

        def raise_exception(message):
            raise ValueError(f"messages: the chat template refused them: {message}")

        try:
            template = _environment().from_string(self.source)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token, eos_token=self.eos_token,
                                   raise_exception=raise_exception)
        except jinja2.TemplateError as e:
            raise ValueError(f"messages: the chat template failed to render: {e}") from None


def _environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    return env
