#!/usr/bin/env python3
"""Drives a running Pagoda server with the official `openai` Python client.

Usage: openai_client_check.py --base-url http://127.0.0.1:8000/v1 --model NAME [--api-key KEY]

Each check talks to the server the way an application would (no raw HTTP),
so the server must pass unmodified through the client's own parsing. Exits
non-zero if any check fails; the last line reads "N passed, M failed".
"""

import argparse
import json
import re
import sys
import traceback

import jsonschema
import openai
from openai import OpenAI

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def greedy(**kwargs):
    """Greedy decoding, with vLLM's extra fields sent the client's way (extra_body)."""
    extra = kwargs.pop("extra_body", {})
    extra.setdefault("repetition_penalty", 1.0)
    return dict(temperature=0.0, extra_body=extra, **kwargs)


@check
def models_list(client, model):
    ids = [m.id for m in client.models.list().data]
    assert model in ids, ids


@check
def chat_streaming(client, model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        **greedy(max_tokens=16),
    )
    roles, pieces, finish, usage, chunks = [], [], None, None, 0
    for chunk in stream:
        chunks += 1
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    text = "".join(pieces)
    assert roles == ["assistant"], roles
    assert text, "no content streamed"
    assert len(pieces) > 1, "content arrives in pieces as it is generated"
    assert finish in ("stop", "length"), finish
    assert usage is not None and usage.completion_tokens >= len(pieces)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # The same conversation without streaming gives the same answer.
    full = client.chat.completions.create(model=model, messages=messages, **greedy(max_tokens=16))
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content == text, (full.choices[0].message.content, text)
    assert full.choices[0].finish_reason == finish


@check
def completions(client, model):
    out = client.completions.create(model=model, prompt="The capital of France is", **greedy(max_tokens=8))
    assert out.object == "text_completion"
    choice = out.choices[0]
    assert choice.text, "empty completion"
    assert choice.finish_reason in ("stop", "length"), choice.finish_reason
    assert out.usage.prompt_tokens > 0 and 0 < out.usage.completion_tokens <= 8, out.usage

    # Streamed completions add up to the same text.
    stream = client.completions.create(
        model=model, prompt="The capital of France is", stream=True, **greedy(max_tokens=8)
    )
    streamed = "".join(c.choices[0].text for c in stream if c.choices)
    assert streamed == choice.text, (streamed, choice.text)


@check
def n_equals_two(client, model):
    out = client.completions.create(
        model=model, prompt="My favourite colour is", n=2, max_tokens=6, temperature=1.0, seed=7
    )
    assert sorted(c.index for c in out.choices) == [0, 1], out.choices
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name a fruit."}],
        n=2,
        max_tokens=6,
        temperature=1.0,
        seed=7,
    )
    assert sorted(c.index for c in chat.choices) == [0, 1]
    assert all(c.message.content is not None for c in chat.choices)


@check
def stop_strings(client, model):
    prompt = "Once upon a time, there was a"
    base = greedy(max_tokens=16, extra_body={"ignore_eos": True})
    full = client.completions.create(model=model, prompt=prompt, **base).choices[0].text
    words = full.split()
    assert len(words) >= 4, full
    stop = next(f" {w}" for w in words[2:] if f" {w}" in full)
    out = client.completions.create(model=model, prompt=prompt, stop=[stop, "\n\n\n"], **base).choices[0]
    assert out.text == full[: full.index(stop)], (out.text, full, stop)
    assert out.finish_reason == "stop", out.finish_reason

    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
        stop=",",
        **greedy(max_tokens=32),
    ).choices[0]
    assert "," not in chat.message.content, chat.message.content
    assert chat.finish_reason == "stop", chat.finish_reason


@check
def logprobs(client, model):
    out = client.completions.create(
        model=model,
        prompt="The capital of France is",
        logprobs=2,
        **greedy(max_tokens=5, extra_body={"ignore_eos": True}),
    ).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == out.text
    assert all(x <= 0.0 for x in lp.token_logprobs)
    assert all(len(top) >= 2 for top in lp.top_logprobs), lp.top_logprobs

    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        logprobs=True,
        top_logprobs=3,
        **greedy(max_tokens=5, extra_body={"ignore_eos": True}),
    ).choices[0]
    content = chat.logprobs.content
    assert len(content) == 5, content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert bytes(entry.bytes) == entry.token.encode("utf-8")
        assert entry.top_logprobs[0].token == entry.token, "greedy takes the most likely token"


@check
def errors(client, model):
    try:
        client.completions.create(model=model, prompt="hi", temperature=-1.0, max_tokens=2)
        raise AssertionError("a negative temperature was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert e.body["param"] == "temperature", e.body
    try:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404
        assert e.body["code"] == "model_not_found", e.body
    try:
        client.completions.create(model=model, prompt="word " * 100_000, max_tokens=2)
        raise AssertionError("a prompt longer than the model length was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "prompt", e.body


SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "role": {"enum": ["admin", "user", "guest"]},
        },
        "required": ["name", "age", "role"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 24},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 16},
                    "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
            "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "maxItems": 3},
            "active": {"type": "boolean"},
        },
        "required": ["title", "address", "tags", "active"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 4},
]


@check
def json_schema_outputs_validate(client, model):
    # Every schema bounds its output (string lengths, integer ranges, array sizes), so 400 tokens
    # always suffice to finish it: an output cut by max_tokens would be the server's fault.
    for schema in SCHEMAS:
        for seed in (1, 2, 3):
            r = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Make up an example record as JSON."}],
                max_tokens=400,
                temperature=1.0,
                seed=seed,
                response_format={"type": "json_schema", "json_schema": {"name": "record", "schema": schema, "strict": True}},
            )
            text = r.choices[0].message.content
            assert r.choices[0].finish_reason == "stop", (r.choices[0].finish_reason, text)
            jsonschema.validate(json.loads(text), schema)
            # The same through completions and vLLM's structured_outputs.
            r = client.completions.create(
                model=model,
                prompt="An example record in JSON: ",
                max_tokens=400,
                temperature=1.0,
                seed=seed,
                extra_body={"structured_outputs": {"json": schema}},
            )
            assert r.choices[0].finish_reason == "stop", (r.choices[0].finish_reason, r.choices[0].text)
            jsonschema.validate(json.loads(r.choices[0].text), schema)


@check
def choice_and_regex_outputs_match(client, model):
    for seed in range(4):
        r = client.completions.create(
            model=model, prompt="The capital of France is", max_tokens=6, temperature=1.0, seed=seed,
            extra_body={"guided_choice": ["yes", "no"]},
        )
        assert r.choices[0].text in ("yes", "no"), r.choices[0].text
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "A phone number?"}], max_tokens=16,
            temperature=1.0, seed=seed, extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}},
        )
        # ASCII digits: `\d` is Unicode-aware in the grammar engine, as in Python's own `re`.
        assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", r.choices[0].message.content), r.choices[0].message.content
    try:
        client.completions.create(model=model, prompt="x", max_tokens=2, extra_body={"guided_regex": "(oops"})
        raise AssertionError("an invalid regex was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "guided_regex", e.body


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


@check
def tool_calls_validate_streamed_or_not(client, model):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    params = WEATHER["function"]["parameters"]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(
            model=model, messages=messages, tools=[WEATHER], tool_choice=choice, max_tokens=100, temperature=0.0
        )
        calls = r.choices[0].message.tool_calls
        assert calls, r
        for call in calls:
            assert call.function.name == "get_weather", call
            jsonschema.validate(json.loads(call.function.arguments), params)
        stream = client.chat.completions.create(
            model=model, messages=messages, tools=[WEATHER], tool_choice=choice, max_tokens=100,
            temperature=0.0, stream=True,
        )
        names, arguments = {}, {}
        for chunk in stream:
            if not chunk.choices:
                continue
            for d in chunk.choices[0].delta.tool_calls or []:
                if d.function and d.function.name:
                    names[d.index] = d.function.name
                if d.function and d.function.arguments:
                    arguments[d.index] = arguments.get(d.index, "") + d.function.arguments
        assert names and set(names.values()) == {"get_weather"}, names
        for text in arguments.values():
            jsonschema.validate(json.loads(text), params)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="the served model name")
    parser.add_argument("--api-key", default="EMPTY")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=300)
    print(f"openai {openai.__version__} against {args.base_url} (model {args.model})")

    passed = failed = 0
    for fn in CHECKS:
        try:
            fn(client, args.model)
            passed += 1
            print(f"ok    {fn.__name__}")
        except Exception:
            failed += 1
            print(f"FAIL  {fn.__name__}")
            traceback.print_exc()
    if args.api_key != "EMPTY":
        wrong = OpenAI(base_url=args.base_url, api_key="wrong-key", max_retries=0)
        try:
            wrong.models.list()
            failed += 1
            print("FAIL  wrong_api_key (accepted)")
        except openai.AuthenticationError:
            passed += 1
            print("ok    wrong_api_key")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
