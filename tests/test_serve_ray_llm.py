"""``loratune serve --ray`` for causal-LM adapters: OpenAI's completions routes on a local Ray Serve deployment
of 2 replicas, with test_serve_llm's tiny Llama and adapters, pinned against its references (``loratune
generate`` for chats, transformers' greedy ``generate`` for plain completions), streaming through Serve's
proxy too; SIGTERM exits 0 leaving no process of its Ray. (A module of its own: test_serve_llm's fixtures have
test_serve's names.)
"""

from __future__ import annotations

import openai
import test_serve_llm
from test_serve_llm import ADAPTERS, PROMPTS, N
from test_serve_ray import deployment, pytestmark, stop_and_check_nothing_is_left  # noqa: F401 - its skip mark

# test_serve_llm's tiny Llama, its adapters and their references (module fixtures; one torch thread, autouse)
base_dir, root, loaded, refs, one_thread = (test_serve_llm.base_dir, test_serve_llm.root, test_serve_llm.loaded,
                                            test_serve_llm.refs, test_serve_llm.one_thread)


def test_two_replicas_answer_completions_and_chats_as_generate(root, refs, base_dir) -> None:
    served = list(ADAPTERS)
    with deployment("--replicas", "2", *[a for n in served for a in ("--adapter", f"{n}={root / n}")]) as d:
        client = openai.OpenAI(base_url=d.url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [str(base_dir), *served]
        for name in served:
            kw = dict(model=name, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=N, temperature=0)
            assert client.chat.completions.create(**kw).choices[0].message.content == refs[name]["chat"][0], name
            chunks = list(client.chat.completions.create(stream=True, **kw))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == refs[name]["chat"][0]
            answer = client.completions.create(model=name, prompt=PROMPTS[:2], max_tokens=N, temperature=0)
            assert [c.text for c in answer.choices] == refs[name]["text"][:2], name
        stop_and_check_nothing_is_left(d)
    assert "stopped: Ray is shut down" in d.lines[-1]
