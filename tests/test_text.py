"""Prompt encoding: a prompt longer than the text encoder reads is truncated with a warning."""

import warnings

import pytest

from tests.helpers import prompt_encoder


def test_long_prompt_is_truncated_with_a_warning_saying_how_many_tokens_were_kept():
    enc = prompt_encoder()
    limit = enc.tokenizer.model_max_length
    long_prompt = "a very detailed painting of " + "a red cat and " * 60
    with pytest.warns(UserWarning, match=rf"has \d+ tokens; the text encoder keeps the first {limit} ") as rec:
        emb = enc([long_prompt, "a dog"])
    assert emb.shape[1] == limit
    assert len(rec) == 1  # only the long prompt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc(["a dog", "a cat"])  # short prompts: no warning
