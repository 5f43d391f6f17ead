"""Server-sent events of a streamed completion, and the response that sends them.

Order of the events of one response (OpenAI's):
  1. chat: one chunk per choice with `delta: {"role": "assistant", "content": ""}`;
     completions with `echo`: one chunk per choice with the prompt's text;
  2. a chunk per batch of tokens that arrived together, `finish_reason` on each choice's last;
  3. with `stream_options.include_usage`: one chunk with `choices: []` and the usage (every
     chunk before it carries `usage: null`);
  4. `data: [DONE]`.
An error after the first event (a deadline, a worker that failed) is sent as one
`data: {"error": ...}` event before `[DONE]`: the status line has already gone out.
"""

from __future__ import annotations

import json

import anyio
from starlette.responses import StreamingResponse

from raypd.server import openai_protocol as proto
from raypd.server.openai_protocol import ApiError


def event(payload) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def sse(server, gen, kind: str, rid: str, created: int, prompt_ids: list[list[int]], choices):
    """The events of one streamed response (see the module docstring)."""
    name, usage_on = server.name, gen.include_usage
    if kind == "chat":
        def chunk(index, text, logprobs, finish, delta_extra=None):
            delta = {**(delta_extra or {}), "content": text} if text or delta_extra else {}
            return proto.chat_chunk(rid, created, name, index, delta, logprobs, finish, usage_on)
        for i in range(len(choices.items)):
            yield event(chunk(i, "", None, None, {"role": "assistant"}))
    else:
        def chunk(index, text, logprobs, finish):
            return proto.completion_chunk(rid, created, name, index, text, logprobs, finish, usage_on)
        if gen.echo and not gen.logprobs:
            for i in range(len(choices.items)):
                yield event(chunk(i, server.echo_text(gen, i // gen.n, prompt_ids[i // gen.n]), None, None))
    offsets = [0] * len(choices.items)
    echoed = [not (gen.echo and gen.logprobs)] * len(choices.items)  # echo with logprobs: on the first batch
    try:
        async for index, batch in choices.events():
            if not echoed[index]:  # the prompt's logprobs came with the first token
                echoed[index] = True
                ids = prompt_ids[index // gen.n]
                lps = server.echo_logprobs(ids, choices.items[index].prompt_logprobs)
                offsets[index] = sum(map(len, lps["tokens"]))
                yield event(chunk(index, server.echo_text(gen, index // gen.n, ids), lps, None))
            tokens = [o for o in batch if o.token_id >= 0]
            text = "".join(o.text for o in tokens)
            logprobs = None
            if gen.logprobs:
                logprobs = server.logprobs_of(kind, [o.token_id for o in tokens], [o.logprob for o in tokens],
                                              offsets[index], [o.top_logprobs for o in tokens])
            offsets[index] += len(text)
            yield event(chunk(index, text, logprobs, batch[-1].finish_reason))
    except ApiError as e:
        server.count(e.status)
        yield event(e.body())
        yield "data: [DONE]\n\n"
        return
    server.observe(choices)
    server.count(200)
    if usage_on:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        yield event(proto.usage_chunk(rid, created, name, obj, server.usage(gen, prompt_ids, choices)))
    yield "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """A text/event-stream response that notices a client going away at once, whatever the ASGI
    server's spec version, and calls `on_close` however it ends (done, disconnected, failed)."""

    def __init__(self, chunks, on_close):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as group:
                async def stream():
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-send
                        pass
                    group.cancel_scope.cancel()

                async def listen():
                    await self.listen_for_disconnect(receive)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                group.start_soon(listen)
        finally:
            self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
