"""Talks to a trine node with OpenAI's own client library, unchanged, and
prints what it got as one JSON object (the Rust test compares it).

    python openai_check.py BASE_URL MODEL
"""
import json
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused-on-an-anonymous-node", max_retries=0)
extra = {"repetition_penalty": 5}
out = {}

out["models"] = [m.id for m in client.models.list().data]

r = client.completions.create(
    model=model, prompt="Hello", max_tokens=24, temperature=0, extra_body=extra
)
out["completion"] = r.choices[0].text
out["completion_finish"] = r.choices[0].finish_reason
out["completion_usage"] = [r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens]

text = ""
finish = None
for chunk in client.completions.create(
    model=model, prompt="Hello", max_tokens=24, temperature=0, stream=True, extra_body=extra
):
    text += chunk.choices[0].text
    finish = chunk.choices[0].finish_reason or finish
out["completion_stream"] = text
out["completion_stream_finish"] = finish

chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    max_tokens=12,
    temperature=0,
    extra_body=extra,
)
out["chat"] = chat.choices[0].message.content
out["chat_role"] = chat.choices[0].message.role
text = ""
for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    max_tokens=12,
    temperature=0,
    stream=True,
    extra_body=extra,
):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
out["chat_stream"] = text

try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    out["unknown_model"] = "accepted"
except openai.NotFoundError as e:
    out["unknown_model"] = f"404: {e.message}"
try:
    client.completions.create(model=model, prompt="x", max_tokens=100000)
    out["too_many_tokens"] = "accepted"
except openai.BadRequestError as e:
    out["too_many_tokens"] = f"400: {e.message}"

print(json.dumps(out))
