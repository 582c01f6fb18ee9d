"""Per-request text: the prompt through the chat template, the output past stop strings.

Pure functions of a tokenizer and strings; the generation thread and the
tokenizing executor call them for one request at a time.
"""

from __future__ import annotations

from typing import Any

from provider.openai.request import ChatCompletionRequest


def template_tools(request: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The ``tools`` the chat template gets: the offered functions, OpenAI-shaped; None if off."""
    functions = request.offered_tools()
    if not functions:
        return None
    out = []
    for f in functions:
        function: dict[str, Any] = {"name": f.name}
        if f.description is not None:
            function["description"] = f.description
        function["parameters"] = f.parameters or {"type": "object", "properties": {}}
        out.append({"type": "function", "function": function})
    return out


def template_kwargs(request: ChatCompletionRequest, tokenizer: Any) -> dict[str, Any]:
    """Extra chat template variables: ``chat_template_kwargs``, and thinking on or off.

    ``reasoning_effort: none`` turns a thinking model's thinking off (its
    template's ``enable_thinking``); the buyer's ``chat_template_kwargs`` win.
    """
    kwargs: dict[str, Any] = {}
    if request.reasoning_effort == "none" and getattr(tokenizer, "has_thinking", False):
        kwargs["enable_thinking"] = False
    kwargs.update(request.chat_template_kwargs or {})
    return kwargs


def encode_chat(tokenizer: Any, request: ChatCompletionRequest) -> list[int]:
    """Prompt token ids of ``request``: its messages through the model's chat template.

    ``developer`` messages go in as ``system``; assistant ``tool_calls`` and
    ``tool`` messages go in as OpenAI sends them (arguments as a mapping);
    the offered tools and :func:`template_kwargs` go to the template. A
    tokenizer without a chat template gets ``role: content`` lines and an
    ``assistant: `` cue (tools then cannot be offered: the engine refuses
    them first). Raises whatever the template raises.
    """
    messages = [m.template_dict() for m in request.messages]
    if tokenizer.has_chat_template:
        tools = template_tools(request)
        extra: dict[str, Any] = template_kwargs(request, tokenizer)
        if tools is not None:
            extra["tools"] = tools
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **extra
        )
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        ids = tokenizer.encode(text + "assistant: ")
    if hasattr(ids, "input_ids"):  # a BatchEncoding from some tokenizers
        ids = ids["input_ids"]
    return list(ids)


def cut_at_stop(held: str, stops: list[str], *, final: bool) -> tuple[str, str, bool]:
    """Split decoded text at the first stop string.

    ``held`` is the text not yet emitted. Returns ``(emit, keep, stopped)``:
    the text to emit now, the tail to hold back because it could be the start
    of a stop string (nothing when ``final``), and whether a stop string was
    found (``emit`` then ends just before it and ``keep`` is empty).
    """
    cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return held[:cut], "", True
    keep = 0 if final else partial_stop_len(held, stops)
    return held[: len(held) - keep], held[len(held) - keep :], False


def partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    if not text:
        return 0
    last = text[-1]
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            # Comparing the last character first keeps long stop strings cheap.
            if stop[k - 1] == last and text.endswith(stop[:k]):
                best = k
                break
    return best
