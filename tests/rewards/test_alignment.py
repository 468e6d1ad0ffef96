"""VLM alignment reward with a tiny random BLIP and a tiny BERT, both saved and loaded from disk."""

import ddpo_rl  # noqa: F401  (first: torchvision shim)
import threading

import pytest
import torch

from ddpo_rl.hub import PretrainedWeightsNotFoundError
from ddpo_rl.rewards.async_reward import AsyncReward
from ddpo_rl.rewards.alignment import (
    BertScoreRecall,
    BlipCaptioner,
    Captioner,
    SentenceEmbeddingSimilarity,
    TextSimilarity,
    VLMAlignmentReward,
    make_vlm_alignment_reward,
)

WORDS = "a an the cat dog horse ant riding bike playing chess washing dishes on is of with".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + WORDS
PROMPTS = ["a cat riding a bike", "a dog washing dishes", "a horse playing chess", "an ant riding a bike"]


def _tokenizer(tmp_path):
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizer(str(vocab), bos_token="[DEC]")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from transformers import (
        BertConfig,
        BertModel,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    root = tmp_path_factory.mktemp("vlm")
    tok = _tokenizer(root)
    torch.manual_seed(0)
    blip = BlipForConditionalGeneration(
        BlipConfig(
            text_config=dict(
                vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64,
                bos_token_id=5, eos_token_id=3, sep_token_id=3, pad_token_id=0,
            ),
            vision_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8,
            ),
        )
    ).eval()
    blip.save_pretrained(root / "blip")
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(
        root / "blip"
    )
    bert = BertModel(
        BertConfig(
            vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64,
        )
    ).eval()
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    return str(root / "blip"), str(root / "bert")


@pytest.fixture(scope="module")
def reward(model_dirs):
    blip, bert = model_dirs
    return make_vlm_alignment_reward(
        blip, similarity="bertscore", similarity_model=bert, device="cpu",
        captioner_kwargs=dict(max_new_tokens=6),
    )


def test_blip_captioner_loads_and_captions(model_dirs):
    cap = BlipCaptioner.from_pretrained(model_dirs[0], device="cpu", max_new_tokens=5, batch_size=2)
    assert isinstance(cap, Captioner) and cap.image_size == 32
    captions = cap(torch.rand(3, 3, 40, 40))
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert all(w in VOCAB for c in captions for w in c.split())  # decoded words, no special tokens
    assert not any("[DEC]" in c or "[SEP]" in c for c in captions)


def test_bertscore_recall(model_dirs):
    score = BertScoreRecall.from_pretrained(model_dirs[1], device="cpu")
    assert isinstance(score, TextSimilarity)
    s = score(["a cat riding a bike", "a dog"], ["a cat riding a bike", "a horse playing chess"])
    assert s.shape == (2,)
    torch.testing.assert_close(s[0], torch.tensor(1.0))  # identical texts: recall 1
    assert s[1] < 0.99
    # recall covers the reference: a caption containing the whole prompt gets recall 1 ...
    p, r, f = score.precision_recall_f1(["a cat riding a bike"], ["a cat"])
    # ... only up to contextual effects; precision is lower when the caption says more
    assert r.item() > p.item()
    torch.testing.assert_close(f, 2 * p * r / (p + r))
    with pytest.raises(ValueError):
        score(["a"], ["a", "b"])


def test_sentence_similarity(model_dirs):
    sim = SentenceEmbeddingSimilarity.from_pretrained(model_dirs[1], device="cpu")
    s = sim(["a cat riding a bike", "a dog"], ["a cat riding a bike", "a horse playing chess"])
    torch.testing.assert_close(s[0], torch.tensor(1.0))
    assert s[1] < 0.999 and s.shape == (2,)


def test_reward_is_similarity_of_caption_and_prompt(reward):
    images = torch.rand(4, 3, 32, 32)
    scores, captions = reward.score_with_captions(images, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, reward.similarity(captions, PROMPTS))
    torch.testing.assert_close(reward(images, PROMPTS), scores)
    with pytest.raises(ValueError, match="prompts"):
        reward(images, PROMPTS[:2])


def test_async_equals_sync(reward):
    images = torch.rand(4, 3, 32, 32)
    sync = reward(images, PROMPTS)
    with AsyncReward(reward) as async_reward:
        futures = [async_reward.submit(images, PROMPTS) for _ in range(2)]
        for future in futures:
            torch.testing.assert_close(future.result(timeout=60), sync)
        torch.testing.assert_close(async_reward(images, PROMPTS), sync)  # synchronous call


def test_async_copies_submitted_images():
    def mean_reward(images, prompts):
        return images.flatten(1).mean(1)

    images = torch.rand(4, 3, 8, 8)
    expected = mean_reward(images, None)
    release = threading.Event()
    with AsyncReward(mean_reward) as async_reward:
        async_reward._pool.submit(release.wait, 10)  # hold the single worker: the next job stays queued
        future = async_reward.submit(images, ["p"] * 4)
        images.zero_()  # the caller reuses its buffer before the job runs: the submitted copy is unaffected
        release.set()
        torch.testing.assert_close(future.result(timeout=10), expected)


def test_async_runs_off_the_calling_thread():
    seen = []
    started, release = threading.Event(), threading.Event()

    def slow_reward(images, prompts):
        seen.append(threading.current_thread().name)
        started.set()
        release.wait(10)
        return images.flatten(1).mean(1)

    with AsyncReward(slow_reward) as r:
        future = r.submit(torch.ones(2, 3, 4, 4), ["a", "b"])
        assert started.wait(10) and not future.done()  # submit returned while the reward still runs
        release.set()
        torch.testing.assert_close(future.result(10), torch.ones(2))
    assert seen[0].startswith("ddpo-reward")


def test_factory_wraps_async_and_reports_missing_models(model_dirs, tmp_path):
    blip, bert = model_dirs
    r = make_vlm_alignment_reward(blip, similarity="sentence", similarity_model=bert, asynchronous=True, device="cpu")
    assert isinstance(r, AsyncReward) and isinstance(r.reward_fn, VLMAlignmentReward)
    r.shutdown()
    with pytest.raises(PretrainedWeightsNotFoundError, match="does not exist"):
        make_vlm_alignment_reward(str(tmp_path / "no" / "blip"), similarity_model=bert)
    with pytest.raises(PretrainedWeightsNotFoundError):
        make_vlm_alignment_reward(str(tmp_path), similarity_model=bert)  # a directory without a model
    with pytest.raises(ValueError, match="similarity"):
        make_vlm_alignment_reward(blip, similarity="clip-score")
