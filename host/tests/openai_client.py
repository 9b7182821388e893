"""Drives `tandem serve` and `tandem-verifier`'s `/v1/completions` with the official `openai`
Python client (and raw HTTP for the server-sent events), item by item of what the client
expects. Run by host/tests/generate.rs; exits non-zero with a message at the first
failure and prints one JSON line of measurements at the end.
"""

import argparse
import http.client
import json
import sys
import urllib.parse

import jinja2.sandbox
import openai

p = argparse.ArgumentParser()
p.add_argument("--serve", required=True, help="http://HOST:PORT of tandem serve")
p.add_argument("--verifier", required=True, help="http://HOST:PORT of tandem-verifier")
p.add_argument("--api-key", required=True)
p.add_argument("--template", required=True, help="file with the GGUF's chat template")
p.add_argument("--family", required=True, help="the verifier's target family")
p.add_argument("--dead-serve", required=True, help="tandem serve whose verifier is down")
args = p.parse_args()

serve = openai.OpenAI(base_url=args.serve + "/v1", api_key=args.api_key, max_retries=0)
cloud = openai.OpenAI(base_url=args.verifier + "/v1", api_key="unused", max_retries=0)
PROMPT = "def fib(n):"
measured = {}
MODEL = {}


def complete(client, **kw):
    """A completion; the model is the server's default unless given."""
    kw.setdefault("model", MODEL[id(client)])
    return client.completions.create(**kw)


def chat(**kw):
    kw.setdefault("model", MODEL[id(serve)])
    return serve.chat.completions.create(**kw)



def check(cond, what):
    if not cond:
        sys.exit(f"FAILED: {what}")


def refused(call, status, param=None, code=None):
    """The call raises the client's error for `status`, with OpenAI's error body."""
    try:
        call()
    except openai.APIStatusError as e:
        check(e.status_code == status, f"expected HTTP {status}, got {e.status_code}: {e}")
        body = e.body if isinstance(e.body, dict) else {}
        check(body.get("message"), f"error without a message: {e.body}")
        check("type" in body and "param" in body and "code" in body, f"error shape: {e.body}")
        if param is not None:
            check(body.get("param") == param, f"param {param!r} expected: {e.body}")
        if code is not None:
            check(body.get("code") == code, f"code {code!r} expected: {e.body}")
        return body["message"]
    sys.exit(f"FAILED: expected HTTP {status}, the call succeeded")


def sse(base, path, body):
    """POSTs `body` with stream: true; returns the raw events (the JSON ones parsed)."""
    u = urllib.parse.urlparse(base)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json",
                                               "Authorization": f"Bearer {args.api_key}"})
    r = c.getresponse()
    raw = r.read().decode()
    check(r.status == 200, f"{path}: HTTP {r.status}: {raw}")
    check(r.getheader("content-type") == "text/event-stream", f"content type {r.getheaders()}")
    events = raw.split("\n\n")
    check(events[-1] == "" and events[-2] == "data: [DONE]", f"stream does not end with [DONE]: {raw!r}")
    out = []
    for e in events[:-2]:
        check(e.startswith("data: "), f"not an SSE data line: {e!r}")
        out.append(json.loads(e[len("data: "):]))
    return out


# --- /v1/models: families and versions -------------------------------------------------
ids = [m.id for m in cloud.models.list().data]
for want in (f"{args.family}@1", f"{args.family}@2", args.family):
    check(want in ids, f"verifier /v1/models lacks {want}: {ids}")
serve_models = serve.models.list().data
serve_ids = [m.id for m in serve_models]
own = serve_ids[0]
check(own.startswith("tandem:"), f"serve's own model first: {serve_ids}")
check(f"{args.family}@2" in serve_ids, f"serve lists the verifier's targets: {serve_ids}")
MODEL[id(serve)] = own
MODEL[id(cloud)] = args.family

# --- system_fingerprint names the target version that answered --------------------------
r = complete(serve, model=own, prompt=PROMPT, max_tokens=4, temperature=0)
check(r.system_fingerprint == f"{args.family}@2", f"newest target answers: {r.system_fingerprint}")
r = complete(serve, model=f"{args.family}@1", prompt=PROMPT, max_tokens=4, temperature=0)
check(r.system_fingerprint == f"{args.family}@1", f"the version asked for: {r.system_fingerprint}")
r = complete(cloud, model=f"{args.family}@1", prompt=PROMPT, max_tokens=4, temperature=0)
check(r.system_fingerprint == f"{args.family}@1", f"verifier fingerprint: {r.system_fingerprint}")

# --- logprobs from the verifier, and what they cost --------------------------------------
N = 40
plain = complete(cloud, prompt=PROMPT, max_tokens=N, temperature=0)
withlp = complete(cloud, prompt=PROMPT, max_tokens=N, temperature=0, logprobs=2)
lp = withlp.choices[0].logprobs
check(plain.choices[0].text == withlp.choices[0].text, "logprobs change nothing of the text")
check(plain.choices[0].logprobs is None, "no logprobs unless asked")
n = withlp.usage.completion_tokens
check(len(lp.tokens) == n == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset),
      f"one entry per token: {n} tokens, {len(lp.tokens)} entries")
for tok, l, top, off in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset):
    check(l <= 0 and len(top) == 2, f"logprob {l}, top {top}")
    # Greedy: the chosen token is the most likely one.
    check(abs(max(top.values()) - l) < 1e-5, f"greedy token {tok!r} is the argmax: {l} vs {top}")
    check(withlp.choices[0].text[off:].startswith(tok) or "\ufffd" in tok, f"offset {off} of {tok!r}")
check("".join(lp.tokens) == withlp.choices[0].text, "the tokens spell the text")


def body_bytes(extra):
    u = urllib.parse.urlparse(args.verifier)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    c.request("POST", "/v1/completions", json.dumps(
        {"prompt": PROMPT, "max_tokens": N, "temperature": 0, **extra}),
        {"Content-Type": "application/json"})
    return len(c.getresponse().read())


base = body_bytes({})
for k in (0, 5):
    measured[f"logprobs_{k}_bytes_per_token"] = round((body_bytes({"logprobs": k}) - base) / n, 1)

# --- stop sequences: across token boundaries, identical to target-only up to the stop ------
full = plain.choices[0].text
# A stop sequence spanning the boundary between two tokens in the middle of the text.
k = next(i for i in range(len(lp.tokens) // 2, len(lp.tokens) - 1)
         if lp.tokens[i].strip() and lp.tokens[i + 1].strip())
stop = lp.tokens[k][-2:] + lp.tokens[k + 1][:2]
cut = full[:full.find(stop)]
measured["stop"] = stop
for name, client in (("serve", serve), ("verifier", cloud)):
    r = complete(client, prompt=PROMPT, max_tokens=N, temperature=0, stop=[stop, "@@@"])
    check(r.choices[0].text == cut, f"{name}: text up to the stop {stop!r}: {r.choices[0].text!r} vs {cut!r}")
    check(r.choices[0].finish_reason == "stop", f"{name}: finish_reason {r.choices[0].finish_reason}")
    r = complete(client, prompt=PROMPT, max_tokens=N, temperature=0)
    check(r.choices[0].text == full, f"{name}: speculative == target-only: {r.choices[0].text!r} vs {full!r}")
    check(r.choices[0].finish_reason == "length", f"{name}: {r.choices[0].finish_reason}")
    # Streamed: the same text; no chunk carries the stop or anything after it.
    base_url = args.serve if name == "serve" else args.verifier
    events = sse(base_url, "/v1/completions", {"prompt": PROMPT, "max_tokens": N,
                                               "temperature": 0, "stream": True, "stop": stop})
    text = "".join(e["choices"][0]["text"] for e in events)
    check(text == cut, f"{name}: streamed text up to the stop: {text!r}")
    check(events[-1]["choices"][0]["finish_reason"] == "stop", f"{name}: {events[-1]}")
    check(all(e["object"] == "text_completion" for e in events), f"{name}: objects")
    check(events[-1]["usage"]["completion_tokens"] > 0, f"{name}: usage on the last chunk")
    # The official client's stream parser reads the same events.
    chunks = list(complete(client, prompt=PROMPT, max_tokens=N, temperature=0,
                                            stop=stop, stream=True))
    check("".join(c.choices[0].text for c in chunks) == cut, f"{name}: client stream")

# --- n: independent choices ----------------------------------------------------------------
for name, client in (("serve", serve), ("verifier", cloud)):
    r = complete(client, prompt=PROMPT, max_tokens=12, temperature=0, n=2)
    check([c.index for c in r.choices] == [0, 1], f"{name}: two choices")
    check(r.choices[0].text == r.choices[1].text == full[:len(r.choices[0].text)],
          f"{name}: greedy choices are identical")
    r = complete(client, prompt=PROMPT, max_tokens=12, temperature=0.9, seed=7, n=2)
    one = [complete(client, prompt=PROMPT, max_tokens=12, temperature=0.9, seed=s).choices[0].text
           for s in (7, 8)]
    check([c.text for c in r.choices] == one, f"{name}: choice i is seed + i: {r.choices} vs {one}")
    check(r.usage.completion_tokens >= 2, f"{name}: usage sums the choices")
    events = sse(args.serve if name == "serve" else args.verifier, "/v1/completions",
                 {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.9, "seed": 7, "n": 2,
                  "stream": True})
    for i in (0, 1):
        t = "".join(c["text"] for e in events for c in e["choices"] if c["index"] == i)
        check(t == one[i], f"{name}: streamed choice {i}: {t!r} vs {one[i]!r}")

# --- chat: the model's own template --------------------------------------------------------
messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
rendered = env.from_string(open(args.template).read()).render(
    messages=messages, add_generation_prompt=True, bos_token="", eos_token="")
check("You are a helpful AI assistant named SmolLM" in rendered, "the GGUF's own template")
r = chat(model=own, messages=messages, max_tokens=24, temperature=0)
want = complete(cloud, prompt=rendered, max_tokens=24, temperature=0)
check(r.choices[0].message.content == want.choices[0].text,
      f"chat through the GGUF template: {r.choices[0].message.content!r} vs {want.choices[0].text!r}")
check(r.choices[0].message.role == "assistant" and r.object == "chat.completion", "chat object")
check(r.system_fingerprint == f"{args.family}@2", f"chat fingerprint {r.system_fingerprint}")
chunks = list(chat(messages=messages, max_tokens=24, temperature=0,
                                            stream=True))
check("".join(c.choices[0].delta.content or "" for c in chunks) == want.choices[0].text,
      "streamed chat")
check(chunks[-1].choices[0].finish_reason in ("stop", "length"), "finish reason on the last chunk")
chat_stop = want.choices[0].text[8:12]
r = chat(messages=messages, max_tokens=24, temperature=0, stop=chat_stop)
check(r.choices[0].message.content == want.choices[0].text[:want.choices[0].text.find(chat_stop)]
      and r.choices[0].finish_reason == "stop", f"chat stop: {r.choices[0]}")

# --- validation: OpenAI-shaped errors with the client's exception classes -----------------
user = [{"role": "user", "content": "hi"}]
for name, client in (("serve", serve), ("verifier", cloud)):
    c = lambda **kw: complete(client, **kw)  # noqa: E731
    refused(lambda: c(prompt=PROMPT, max_tokens=-5), 400, "max_tokens", "invalid_value")
    refused(lambda: c(prompt=PROMPT, max_tokens=0), 400, "max_tokens")
    msg = refused(lambda: c(prompt=PROMPT, max_tokens=100000), 400, "max_tokens")
    check("limit" in msg, f"{name}: says what the limit is: {msg}")
    refused(lambda: c(prompt=PROMPT, temperature=2.5), 400, "temperature")
    refused(lambda: c(prompt=PROMPT, top_p=0), 400, "top_p")
    refused(lambda: c(prompt=PROMPT, n=17), 400, "n")
    refused(lambda: c(prompt=PROMPT, stop=["a", "b", "c", "d", "e"]), 400, "stop")
    refused(lambda: c(prompt=PROMPT, presence_penalty=1.0), 400, "presence_penalty",
            "unsupported_parameter")
    refused(lambda: c(model="no-such-model", prompt=PROMPT), 404, "model", "model_not_found")
msg = refused(lambda: complete(cloud, prompt="word " * 2100, max_tokens=2000), 400, "prompt",
              "context_length_exceeded")
check("shorten the prompt" in msg, msg)
refused(lambda: complete(serve, prompt=PROMPT, logprobs=2), 400, "logprobs",
        "unsupported_parameter")
sc = chat
refused(lambda: sc(messages=[], max_tokens=4), 400, "messages")
refused(lambda: sc(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role")
refused(lambda: sc(messages=[{"role": "user"}]), 400)
refused(lambda: sc(messages=user, max_completion_tokens=-1), 400, "max_completion_tokens")
refused(lambda: sc(messages=user, logprobs=True), 400, "logprobs")
refused(lambda: sc(messages=user, temperature=-1), 400, "temperature")
# 429 while --max-concurrent (1) generations run; 503 when the verifier is unreachable.
u = urllib.parse.urlparse(args.serve)
running = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
running.request("POST", "/v1/completions", json.dumps(
    {"prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}),
    {"Content-Type": "application/json", "Authorization": f"Bearer {args.api_key}"})
first = running.getresponse()
check(first.status == 200, f"the long stream runs: {first.status}")
msg = refused(lambda: complete(serve, prompt=PROMPT, max_tokens=1), 429, None, "rate_limit_exceeded")
check("--max-concurrent" in msg, msg)
check(first.read().decode().endswith("data: [DONE]\n\n"), "the long stream ends normally")
dead = openai.OpenAI(base_url=args.dead_serve + "/v1", api_key=args.api_key, max_retries=0)
msg = refused(lambda: dead.completions.create(model=own, prompt=PROMPT, max_tokens=1), 503)
check("no verifier could be reached" in msg, msg)
refused(lambda: dead.models.list(), 503)

nokey = openai.OpenAI(base_url=args.serve + "/v1", api_key="wrong", max_retries=0)
try:
    nokey.completions.create(model=own, prompt=PROMPT, max_tokens=1)
    sys.exit("FAILED: a wrong API key was accepted")
except openai.AuthenticationError as e:
    check(e.body.get("code") == "invalid_api_key", f"401 shape: {e.body}")

print(json.dumps(measured))
