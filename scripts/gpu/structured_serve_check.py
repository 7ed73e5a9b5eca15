"""Structured outputs and tool calls through `pagoda serve --device cuda` on the real model
(SmolLM2), checked by hand-written validators (no jsonschema on the GPU machine).
Usage: python3 structured_serve_check.py BASE_URL  -> prints a summary, exits 1 on a failure."""
import json
import re
import sys
import urllib.request

BASE = sys.argv[1]
failures = []
counts = {}


def post(path, body):
    req = urllib.request.Request(BASE + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def check(name, ok, detail):
    counts[name] = counts.get(name, 0) + 1
    if not ok:
        failures.append(f"{name}: {detail}")


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "sky": {"enum": ["sunny", "cloudy", "rain"]},
        "temps": {"type": "array", "items": {"type": "integer", "minimum": -30, "maximum": 50}, "maxItems": 4},
        "wind": {"type": "object", "properties": {"kmh": {"type": "integer", "minimum": 0, "maximum": 300}},
                 "required": ["kmh"], "additionalProperties": False},
    },
    "required": ["city", "sky", "temps", "wind"],
    "additionalProperties": False,
}


def valid_weather(text):
    try:
        v = json.loads(text)
    except ValueError:
        return False
    return (isinstance(v, dict) and sorted(v) == ["city", "sky", "temps", "wind"]
            and isinstance(v["city"], str) and len(v["city"]) <= 20 and v["sky"] in ("sunny", "cloudy", "rain")
            and isinstance(v["temps"], list) and len(v["temps"]) <= 4
            and all(isinstance(t, int) and -30 <= t <= 50 for t in v["temps"])
            and isinstance(v["wind"], dict) and list(v["wind"]) == ["kmh"]
            and isinstance(v["wind"]["kmh"], int) and 0 <= v["wind"]["kmh"] <= 300)


msgs = [{"role": "user", "content": "Describe the weather in Paris as JSON."}]
for seed in range(4):
    s, r = post("/v1/chat/completions", {"messages": msgs, "max_tokens": 200, "temperature": 1.0, "seed": seed, "n": 4,
                                          "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}})
    for c in r.get("choices", []):
        check("json_schema", s == 200 and c["finish_reason"] == "stop" and valid_weather(c["message"]["content"]), c)
    check("json_schema status", s == 200, r)
for seed in range(3):
    s, r = post("/v1/completions", {"prompt": "Is Paris in France?", "max_tokens": 8, "temperature": 1.0, "seed": seed, "n": 4,
                                    "guided_choice": ["yes", "no", "maybe"]})
    for c in r.get("choices", []):
        check("guided_choice", c["text"] in ("yes", "no", "maybe"), c)
    s, r = post("/v1/completions", {"prompt": "A phone number:", "max_tokens": 20, "temperature": 1.0, "seed": seed, "n": 4,
                                    "guided_regex": "[0-9]{3}-[0-9]{4}"})
    for c in r.get("choices", []):
        check("guided_regex", re.fullmatch(r"[0-9]{3}-[0-9]{4}", c["text"]) is not None, c)
tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}]
for choice in ["required", {"type": "function", "function": {"name": "get_weather"}}]:
    s, r = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Weather in Rome?"}], "tools": tools,
                                          "tool_choice": choice, "max_tokens": 120, "temperature": 0.7, "seed": 1, "n": 3})
    for c in r.get("choices", []):
        calls = c["message"].get("tool_calls") or []
        # Cut off by max_tokens, the last call's arguments may be cut short (as OpenAI's are); every
        # call before it must be whole.
        whole = calls[:-1] if c["finish_reason"] == "length" else calls
        ok = len(calls) >= 1
        for call in whole:
            try:
                a = json.loads(call["function"]["arguments"])
                ok = ok and call["function"]["name"] == "get_weather" and sorted(a) == ["city", "unit"] and a["unit"] in ("c", "f")
            except ValueError:
                ok = False
        check(f"tool_choice {json.dumps(choice)}", s == 200 and ok, c)
# Logit constraints now work on CUDA too.
s, r = post("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
                                "allowed_token_ids": [28, 29, 30], "logprobs": 0, "return_tokens_as_token_ids": True})
toks = r["choices"][0]["logprobs"]["tokens"] if s == 200 else []
check("allowed_token_ids", s == 200 and len(toks) == 4 and all(t in ("token_id:28", "token_id:29", "token_id:30") for t in toks), r)
s, r = post("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "logit_bias": {"30": 100}})
check("logit_bias", s == 200, r)
s, r = post("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "bad_words": ["Paris"]})
check("bad_words", s == 200 and "Paris" not in r["choices"][0]["text"], r)

print("checks:", json.dumps(counts))
print("failures:", len(failures))
for f in failures[:20]:
    print("  FAIL", f)
sys.exit(1 if failures else 0)
