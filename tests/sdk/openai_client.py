"""Drives a running routellm server with the official OpenAI Python SDK.

Usage: openai_client.py BASE_URL MODE, MODE being `mock` (both models behind the test's
mock upstream), `echo` (the built-in offline models), `limits` (echo models behind the
key `sk-client`, limited to 60 requests a minute and to `router-random`), `failover`
(a strong tier whose first deployment is down and whose second is the test's mock) or
`budget` (echo models with prices behind `sk-client`, whose budget a few answers spend)
or `cache` (echo models with the response cache on).
Exits non-zero on any failure.
"""
import sys

import openai

base_url, mode = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="sk-client", max_retries=0)
messages = [{"role": "user", "content": "What is the capital of France?"}]


def expect(condition, what):
    if not condition:
        raise AssertionError(what)


def stream_text(model, **extra):
    stream = client.chat.completions.create(model=model, messages=messages, stream=True, **extra)
    pieces, models = [], set()
    for chunk in stream:
        models.add(chunk.model)
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces), models


if mode == "mock":
    raw = client.chat.completions.with_raw_response.create(model="router-random-0", messages=messages)
    expect(raw.headers["x-routellm-tier"] == "strong", raw.headers)
    expect(raw.headers["x-routellm-model"] == "openai/gpt-4o", raw.headers)
    completion = raw.parse()
    expect(completion.model == "gpt-4o", completion.model)
    expect(completion.choices[0].message.content == "answer from mock", completion)

    text, models = stream_text("router-random-1")
    expect(text == "from mock done", text)
    expect(models == {"llama3-8b"}, models)

    tools = [{
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        },
    }]
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}, "strict": True}}
    completion = client.chat.completions.create(
        model="router-random-0.0", messages=messages, tools=tools, tool_choice="auto", response_format=schema,
        extra_body={"mock": "ok", "seed_marker": 42}, extra_headers={"X-Request-Id": "sdk-trace-1"},
    )
    expect(completion.choices[0].message.content == "answer from mock", completion)

    try:
        client.chat.completions.create(model="router-random-2", messages=messages)
        raise AssertionError("a threshold above 1 must fail")
    except openai.BadRequestError as error:
        expect(error.status_code == 400, error)
        expect("outside [0, 1]" in error.message, error.message)

    try:
        client.chat.completions.create(model="router-nope-0.5", messages=messages)
        raise AssertionError("an unknown router must fail")
    except openai.BadRequestError as error:
        expect("Available routers: random" in error.message, error.message)

    try:
        client.chat.completions.create(model="gpt-5-imaginary", messages=messages)
        raise AssertionError("an unknown model must fail")
    except openai.NotFoundError as error:
        expect(error.code == "model_not_found", error)

    try:
        client.chat.completions.create(model="router-random-0", messages=messages, extra_body={"mock": "rate_limited"})
        raise AssertionError("the upstream's 429 must reach the client")
    except openai.RateLimitError as error:
        expect(error.code == "rate_limit_exceeded", error)

    try:
        stream_text("router-random-0", extra_body={"mock": "break_soon"})
        raise AssertionError("a broken stream must raise")
    except openai.APIError as error:
        expect("stream broke" in str(error.message), error.message)

    # An upstream that closes its stream cleanly before the end must not look like a whole answer.
    try:
        stream_text("router-random-0", extra_body={"mock": "truncated"})
        raise AssertionError("a stream closed before its end must raise")
    except openai.APIError as error:
        expect("closed before its final event" in str(error.message), error.message)

    raw = client.responses.with_raw_response.create(
        model="router-random-0", input="What is the capital of France?", instructions="be brief"
    )
    expect(raw.headers["x-routellm-tier"] == "strong", raw.headers)
    expect(raw.parse().output_text == "response from mock", raw.parse())
    events = list(client.responses.create(model="router-random-1", input=[{"role": "user", "content": "hi"}], stream=True))
    expect([event.type for event in events] == ["response.output_text.delta", "response.completed"], events)
    expect(events[-1].response.usage.output_tokens == 3, events[-1])
    broken = list(client.responses.create(model="router-random-0", input="hi", stream=True, extra_body={"mock": "break_soon"}))
    expect(broken[-1].type == "error" and "stream broke" in broken[-1].message, broken[-1])
    cut = list(client.responses.create(model="router-random-0", input="hi", stream=True, extra_body={"mock": "truncated"}))
    expect(cut[-1].type == "error" and "closed before its final event" in cut[-1].message, cut[-1])

    raw = client.completions.with_raw_response.create(model="router-random-0", prompt="Once upon a time", max_tokens=5)
    expect(raw.headers["x-routellm-tier"] == "strong", raw.headers)
    expect(raw.parse().choices[0].text == "completion from mock", raw.parse())
    chunks = list(client.completions.create(model="router-random-1", prompt=["a", "b"], stream=True))
    expect("".join(chunk.choices[0].text for chunk in chunks) == "completion from mock done", chunks)
    try:
        list(client.completions.create(model="router-random-0", prompt="hi", stream=True, extra_body={"mock": "break_soon"}))
        raise AssertionError("a broken completions stream must raise")
    except openai.APIError as error:
        expect("stream broke" in str(error.message), error.message)

    ids = [model.id for model in client.models.list()]
    expect("router-random-0.5" in ids and "openai/gpt-4o" in ids, ids)
    expect(client.models.retrieve("router-random-0.3").id == "router-random-0.3", "retrieve a router")
    expect(client.models.retrieve("openai/gpt-4o").owned_by == "openai", "retrieve a model")
    try:
        client.models.retrieve("gpt-5-imaginary")
        raise AssertionError("an unknown model must not be found")
    except openai.NotFoundError as error:
        expect(error.code == "model_not_found", error)

    # A client hard-coded to a model name is routed when the server makes that name an alias.
    raw = client.chat.completions.with_raw_response.create(model="gpt-4", messages=messages)
    expect(raw.headers["x-routellm-router"] == "random", raw.headers)
    expect(raw.headers["x-routellm-tier"] == "weak", raw.headers)
    expect(raw.parse().model == "llama3-8b", raw.parse().model)
    expect(client.models.retrieve("gpt-4").alias_for == "router-random-1", "retrieve an alias")
    # Embeddings are no routed endpoint: the config passes them through to the strong model.
    embedding = client.embeddings.create(model="text-embedding-3-small", input="Hello", encoding_format="float")
    expect(embedding.data[0].embedding == [0.25, -0.5] and embedding.usage.prompt_tokens == 8, embedding)
elif mode == "echo":
    completion = client.chat.completions.create(model="router-random-0", messages=messages)
    content = completion.choices[0].message.content
    expect("echo/gpt-4o" in content and "capital of France" in content, content)
    expect(completion.usage.total_tokens > 0, completion.usage)
    text, models = stream_text("router-random-1", stream_options={"include_usage": True})
    expect("echo/mixtral" in text and "capital of France" in text, text)
    expect(models == {"mixtral"}, models)

    completion = client.completions.create(model="router-random-1", prompt="What is the capital of France?")
    expect("echo/mixtral" in completion.choices[0].text and completion.usage.total_tokens > 0, completion)
    chunks = list(client.completions.create(
        model="router-random-0", prompt="What is the capital of France?", stream=True, stream_options={"include_usage": True}
    ))
    expect("echo/gpt-4o" in "".join(chunk.choices[0].text for chunk in chunks if chunk.choices), chunks)
    expect(chunks[-1].usage.completion_tokens > 0, chunks[-1])

    response = client.responses.create(model="router-random-0", input="What is the capital of France?")
    expect("echo/gpt-4o" in response.output_text and "capital of France" in response.output_text, response)
    expect(response.usage.total_tokens > 0, response.usage)
    # The SDK's streaming helper rebuilds the response from the events, so it checks their order and shape.
    with client.responses.stream(model="router-random-1", input=[{"role": "user", "content": "What is the capital of France?"}]) as stream:
        deltas = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    expect(deltas == final.output_text and "echo/mixtral" in deltas, (deltas, final))
    expect(final.usage.output_tokens > 0, final.usage)
elif mode == "limits":
    raw = client.chat.completions.with_raw_response.create(model="router-random-0", messages=messages)
    expect(raw.headers["x-ratelimit-limit-requests"] == "60", raw.headers)
    expect(raw.headers["x-ratelimit-remaining-requests"] == "59", raw.headers)
    expect(raw.headers["x-ratelimit-reset-requests"] == "1s", raw.headers)
    # This key may use router-random only: the listing shows that, other models are not there for it.
    expect([model.id for model in client.models.list()] == ["router-random-0.5"], client.models.list())
    try:
        client.chat.completions.create(model="echo/mixtral", messages=messages)
        raise AssertionError("a model outside the key's list answered")
    except openai.NotFoundError as error:
        expect(error.code == "model_not_found", error)
    # Spend the burst: the 429 comes once a minute's worth is used (plus what refilled meanwhile).
    admitted = 2  # the first request and the one for a model outside the list
    while True:
        try:
            client.chat.completions.create(model="router-random-0", messages=messages)
            admitted += 1
        except openai.RateLimitError as error:
            expect(error.status_code == 429 and error.code == "rate_limit_exceeded", error)
            expect(error.body["type"] == "requests" and "`sdk`" in error.body["message"], error.body)
            wait_ms = int(error.response.headers["retry-after-ms"])
            expect(0 < wait_ms <= 1000, error.response.headers)
            break
        # A minute's worth plus what refills meanwhile (one a second); far more means no limit.
        expect(admitted <= 300, "no limit after 300 requests")
    expect(admitted >= 60, f"refused after {admitted}")
    # The SDK's own retry waits as told and then gets through.
    patient = openai.OpenAI(base_url=base_url, api_key="sk-client", max_retries=3)
    raw = patient.chat.completions.with_raw_response.create(model="router-random-0", messages=messages)
    expect(raw.retries_taken >= 1, f"answered without a retry: {raw.retries_taken}")
    expect("echo/gpt-4o" in raw.parse().choices[0].message.content, raw.parse())
elif mode == "failover":
    # The client does not retry: any success here is the proxy's failover, invisible to it.
    raw = client.chat.completions.with_raw_response.create(model="router-random-0", messages=messages)
    expect(raw.headers["x-routellm-model"] == "groq/strong-backup", raw.headers)
    expect(raw.headers["x-routellm-tier"] == "strong", raw.headers)
    expect(raw.parse().choices[0].message.content == "answer from backup", raw.parse())
    text, _ = stream_text("router-random-0")
    expect(text == "from backup done", text)
elif mode == "budget":
    answered = 0
    while True:
        try:
            client.chat.completions.create(model="router-random-0", messages=messages)
            answered += 1
        except openai.RateLimitError as error:
            expect(error.code == "insufficient_quota" and error.body["type"] == "insufficient_quota", error.body)
            expect("`sdk`" in error.body["message"] and "renews" in error.body["message"], error.body)
            expect(error.response.headers["x-should-retry"] == "false", error.response.headers)
            break
        expect(answered <= 20, "no budget after 20 answers")
    expect(answered >= 1, "refused before any answer")
    # The SDK's automatic retry leaves a spent budget alone (it would not come back in seconds).
    patient = openai.OpenAI(base_url=base_url, api_key="sk-client", max_retries=3)
    try:
        patient.chat.completions.create(model="router-random-0", messages=messages)
        raise AssertionError("answered past the budget")
    except openai.RateLimitError as error:
        expect(error.code == "insufficient_quota", error)
elif mode == "cache":
    # The echo models number their answers, so the same id twice is the same answer given again.
    first = client.chat.completions.with_raw_response.create(model="router-random-0", messages=messages, seed=7)
    again = client.chat.completions.with_raw_response.create(model="router-random-0", messages=messages, seed=7)
    expect(first.headers["x-routellm-cache"] == "miss", first.headers)
    expect(again.headers["x-routellm-cache"] == "hit", again.headers)
    expect(again.headers["x-routellm-tier"] == "strong", again.headers)
    expect(again.parse().id == first.parse().id, (first.parse().id, again.parse().id))
    expect(again.parse().choices[0].message.content == first.parse().choices[0].message.content, again.parse())
    fresh = client.chat.completions.with_raw_response.create(
        model="router-random-0", messages=messages, seed=7, extra_headers={"Cache-Control": "no-cache"}
    )
    expect(fresh.headers["x-routellm-cache"] == "refresh", fresh.headers)
    expect(fresh.parse().id != first.parse().id, fresh.parse().id)
    # A stream given again arrives in one piece; the SDK reads the same chunks from it.
    def stream_ids():
        stream = client.chat.completions.create(model="router-random-0", messages=messages, stream=True)
        chunks = list(stream)
        return [chunk.id for chunk in chunks], "".join(
            chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices
        )
    streamed = stream_ids()
    replayed = streamed
    for _ in range(50):
        replayed = stream_ids()
        if replayed[0] == streamed[0]:
            break
    expect(replayed == streamed and streamed[1], (streamed, replayed))
else:
    raise SystemExit(f"unknown mode {mode}")
print("sdk checks passed")
