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
Events that are ready together go out in one write: the opening chunks of all choices, and the
last token batch with the usage chunk, `[DONE]` and the end of the chunked body (`Last`), so a
one-token answer costs two socket writes (headers, body) instead of five.
"""

from __future__ import annotations

import json

import anyio
from starlette.responses import StreamingResponse

from raypd.server import openai_protocol as proto
from raypd.server.openai_protocol import ApiError


DONE = "data: [DONE]\n\n"


class Last(str):
    """The final events of a response: sent together with the end of the body."""


def event(payload) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def sse(server, gen, kind: str, rid: str, created: int, prompt_ids: list[list[int]], choices):
    """The events of one streamed response (see the module docstring)."""
    name, usage_on = server.name, gen.include_usage
    if kind == "chat":
        def chunk(index, text, logprobs, finish, delta_extra=None):
            delta = {**(delta_extra or {}), "content": text} if text or delta_extra else {}
            return proto.chat_chunk(rid, created, name, index, delta, logprobs, finish, usage_on)
        yield "".join(event(chunk(i, "", None, None, {"role": "assistant"})) for i in range(len(choices.items)))
    else:
        def chunk(index, text, logprobs, finish):
            return proto.completion_chunk(rid, created, name, index, text, logprobs, finish, usage_on)
        if gen.echo and not gen.logprobs:
            yield "".join(event(chunk(i, server.echo_text(gen, i // gen.n, prompt_ids[i // gen.n]), None, None))
                          for i in range(len(choices.items)))
    offsets = [0] * len(choices.items)
    echoed = [not (gen.echo and gen.logprobs)] * len(choices.items)  # echo with logprobs: on the first batch
    num_finished, tail = 0, ""  # tail: the last batch's event, sent with the usage and [DONE]
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
            piece = event(chunk(index, text, logprobs, batch[-1].finish_reason))
            num_finished += batch[-1].finish_reason is not None
            if num_finished < len(choices.items):
                yield piece
            else:  # every choice has ended: the events loop ends without waiting
                tail = piece
    except ApiError as e:
        server.count(e.status)
        yield Last(tail + event(e.body()) + DONE)
        return
    server.observe(choices)
    server.count(200)
    if usage_on:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        tail += event(proto.usage_chunk(rid, created, name, obj, server.usage(gen, prompt_ids, choices)))
    yield Last(tail + DONE)


class EventStream(StreamingResponse):
    """A text/event-stream response that notices a client going away at once, whatever the ASGI
    server's spec version, and calls `on_close` however it ends (done, disconnected, failed)."""

    def __init__(self, chunks, on_close):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def stream_response(self, send) -> None:
        """As StreamingResponse's, except that `Last` goes out with the end of the chunked body
        (one write)."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            is_last = isinstance(chunk, Last)
            await send({"type": "http.response.body", "body": chunk.encode(), "more_body": not is_last})
            if is_last:
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

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
