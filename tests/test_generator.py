"""Text layer on the embedded model: chat template, stop strings, streaming deltas, stats, context checks."""
import pytest

from medusa_core.request import Request, SamplingParams


def test_chat_template_comes_from_the_model(embedded_generator):
    gen = embedded_generator
    ids = gen.encode_chat([{"role": "user", "content": "Hi"}])
    text = gen.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")


def test_stop_string_cuts_text_and_streams_match(embedded_generator):
    gen = embedded_generator
    ids = tuple(gen.encode("Count: 1, 2, 3, 4, 5,"))
    full = gen.generate([Request(prompt_ids=ids, max_tokens=20, ignore_eos=True)])[0]
    assert " 8" in full.text, full.text
    cut = gen.generate([Request(prompt_ids=ids, max_tokens=20, stop=(" 8",), ignore_eos=True)])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(" 8")]
    request = Request(prompt_ids=ids, max_tokens=20, stop=(" 8",), ignore_eos=True)
    deltas = [d for step in gen.stream([request]) for d in step]
    assert "".join(d.text for d in deltas) == cut.text
    assert [d.finish_reason for d in deltas].count("stop") == 1 and deltas[-1].stats is not None


def test_stats_add_up(embedded_generator):
    gen = embedded_generator
    r = gen.generate([Request(prompt_ids=tuple(gen.encode("Hello")), max_tokens=30, ignore_eos=True)])[0]
    s = r.stats
    assert s.generated_tokens == 30 == len(r.token_ids) and r.finish_reason == "length"
    assert sum(s.accept_len_histogram) == s.decode_steps
    assert s.mean_accepted_length == pytest.approx(
        sum((a + 1) * n for a, n in enumerate(s.accept_len_histogram)) / s.decode_steps)
    assert s.accepted_per_head[0] == sum(s.accept_len_histogram[1:])
    assert 0 < s.time_to_first_token_s <= s.wall_time_s and s.tokens_per_second > 0


def test_eos_stops_unless_ignored(embedded_generator):
    gen = embedded_generator
    ids = tuple(gen.encode_chat([{"role": "user", "content": "What is 2+2? Answer with one number."}]))
    r = gen.generate([Request(prompt_ids=ids, max_tokens=60)])[0]
    assert r.finish_reason == "stop" and len(r.token_ids) < 60
    assert all(t not in gen.backend.eos_token_ids for t in r.token_ids)
    n = len(r.token_ids) + 3
    past = gen.generate([Request(prompt_ids=ids, max_tokens=n, ignore_eos=True)])[0]
    assert past.finish_reason == "length" and len(past.token_ids) == n
    assert past.token_ids[: n - 3] == r.token_ids and past.token_ids[n - 3] in gen.backend.eos_token_ids


@pytest.mark.parametrize("n_prompt, max_new, match", [(0, 5, "empty"), (10, 10 ** 6, "context window")])
def test_context_checks(embedded_generator, n_prompt, max_new, match):
    with pytest.raises(ValueError, match=match):
        embedded_generator.generate([Request(prompt_ids=(1,) * n_prompt, max_tokens=max_new)])


def test_sampled_request_runs_with_seed(embedded_generator):
    gen = embedded_generator
    req = Request(prompt_ids=tuple(gen.encode("Once upon a time")), max_tokens=16,
                  sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=3, acceptance="lossless"))
    a, b = gen.generate([req])[0], gen.generate([req])[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0
