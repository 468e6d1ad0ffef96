"""Prompt-image alignment judged by a vision-language model.

The DDPO paper rewards alignment by asking a VLM (LLaVA) to describe the image and scoring the
description against the prompt with BERTScore recall. This module keeps that structure behind
two small interfaces, so the VLM and the text metric can be swapped:

- a :class:`Captioner` maps images to text (:class:`BlipCaptioner`: a transformers BLIP
  captioning model, ``Salesforce/blip-image-captioning-*``);
- a :class:`TextSimilarity` scores candidate texts against references
  (:class:`BertScoreRecall`, BERTScore-style greedy token matching with any transformers encoder;
  :class:`SentenceEmbeddingSimilarity`, cosine of mean-pooled sentence embeddings);
- :class:`VLMAlignmentReward` = similarity(caption(image), prompt).

VLM inference is slow: ``asynchronous=True`` wraps the reward in
:class:`~ddpo_rl.rewards.async_reward.AsyncReward` (scored in a thread while sampling goes on).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from ddpo_rl.hub import PretrainedWeightsNotFoundError, looks_like_local_path
from ddpo_rl.precision import resolve_dtype
from ddpo_rl.rewards._clip_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess_images
from ddpo_rl.rewards.async_reward import AsyncReward
from ddpo_rl.rewards.registry import register_reward

DEFAULT_BLIP_MODEL = "Salesforce/blip-image-captioning-large"
DEFAULT_BERTSCORE_MODEL = "microsoft/deberta-xlarge-mnli"
"""The encoder the DDPO reference's BERTScore used."""
DEFAULT_SENTENCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

BERTSCORE_LAYERS = {
    "microsoft/deberta-xlarge-mnli": 40,
    "roberta-large": 17,
    "bert-base-uncased": 9,
    "microsoft/deberta-large-mnli": 18,
    "distilbert-base-uncased": 5,
}
"""Hidden layer BERTScore uses for some encoders (bert_score's tuned defaults); others: last layer."""


@runtime_checkable
class Captioner(Protocol):
    """Images [B, 3, H, W] in [0, 1] -> B strings (captions, or answers to a fixed question)."""

    def __call__(self, images: torch.Tensor) -> list[str]: ...


@runtime_checkable
class TextSimilarity(Protocol):
    """(candidates, references), two lists of B strings -> float tensor [B], higher = closer."""

    def __call__(self, candidates: Sequence[str], references: Sequence[str]) -> torch.Tensor: ...


def _default_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _from_pretrained(loader: Callable, name_or_path: str, what: str, **kwargs):
    """``loader(name_or_path, **kwargs)`` with one clear error when the weights are not there."""
    name_or_path = os.fspath(name_or_path)
    if looks_like_local_path(name_or_path) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise PretrainedWeightsNotFoundError(f"{what} directory '{name_or_path}' does not exist")
    try:
        return loader(os.path.expanduser(name_or_path), **kwargs)
    except (OSError, ValueError) as err:
        msg = str(err).strip().splitlines()[0][:150] if str(err).strip() else type(err).__name__
        raise PretrainedWeightsNotFoundError(
            f"could not load {what} from '{name_or_path}' ({msg}); run `hf download "
            f"{name_or_path} --local-dir <dir>` and pass that directory (HF_HUB_OFFLINE=1 uses the local cache only)"
        ) from err


class BlipCaptioner:
    """Caption images with a transformers BLIP captioning model.

    Args:
        model: a ``BlipForConditionalGeneration``.
        tokenizer: its tokenizer (for the optional text prefix and for decoding).
        image_size: side the images are resized to (default: the model's vision config).
        image_mean, image_std: normalisation (BLIP uses CLIP's).
        prompt: optional text prefix for conditional captioning (e.g. ``"a photography of"``).
        max_new_tokens, num_beams: generation settings (greedy by default: deterministic).
        batch_size: images per ``generate`` call.
        device, dtype: where and in what dtype the model runs (``None``: leave as is).
    """

    def __init__(
        self,
        model,
        tokenizer,
        image_size: int | None = None,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        prompt: str | None = None,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        batch_size: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.model = model.requires_grad_(False).eval()
        if device is not None or dtype is not None:
            self.model.to(device=device, dtype=dtype)
        self.tokenizer = tokenizer
        self.image_size = int(image_size or model.config.vision_config.image_size)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_BLIP_MODEL,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> "BlipCaptioner":
        """Load a BLIP captioning model and its processor (hub id or local directory).

        ``kwargs`` go to :class:`BlipCaptioner` (``prompt``, ``max_new_tokens``...).
        """
        from transformers import BlipForConditionalGeneration, BlipProcessor

        extra = {"revision": revision} if revision else {}
        model = _from_pretrained(BlipForConditionalGeneration.from_pretrained, name_or_path, "BLIP model", **extra)
        processor = _from_pretrained(BlipProcessor.from_pretrained, name_or_path, "BLIP processor", **extra)
        ip = processor.image_processor
        size = getattr(ip.size, "height", None) or (ip.size.get("height") if isinstance(ip.size, dict) else ip.size)
        if dtype is None:
            dtype = torch.float16 if _default_device(device).type == "cuda" else torch.float32
        return cls(
            model,
            processor.tokenizer,
            image_size=int(size),
            image_mean=ip.image_mean,
            image_std=ip.image_std,
            device=_default_device(device),
            dtype=dtype,
            **kwargs,
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[str]:
        dtype = next(self.model.parameters()).dtype
        captions: list[str] = []
        for chunk in images.split(self.batch_size):
            pixels = preprocess_images(
                chunk.to(self.device), self.image_size, self.image_mean, self.image_std, center_crop=False
            ).to(dtype)
            kwargs: dict[str, Any] = {}
            if self.prompt:
                ids = self.tokenizer([self.prompt] * len(chunk), return_tensors="pt").input_ids
                kwargs["input_ids"] = ids.to(self.device)
            out = self.model.generate(
                pixel_values=pixels,
                max_new_tokens=self.max_new_tokens,
                num_beams=self.num_beams,
                do_sample=False,
                **kwargs,
            )
            captions += [c.strip() for c in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        return captions


class _TextEncoder:
    """A transformers encoder + tokenizer giving token states, attention and special-token masks."""

    def __init__(self, model, tokenizer, layer: int | None = None, max_length: int = 128, batch_size: int = 64):
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.layer = layer
        self.max_length = max_length
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token states [N, L, D] (float32), attention mask [N, L] and content-token mask [N, L]
        (attention minus special tokens) of ``texts``."""
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )
        special = batch.pop("special_tokens_mask").bool()
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.layer is None:
            states = self.model(**batch).last_hidden_state
        else:
            states = self.model(**batch, output_hidden_states=True).hidden_states[self.layer]
        attention = batch["attention_mask"].bool()
        content = attention & ~special.to(self.device)
        return states.float(), attention, content


def _load_text_encoder(name_or_path: str, device, dtype, **kwargs):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name_or_path, "tokenizer", **kwargs)
    model = _from_pretrained(AutoModel.from_pretrained, name_or_path, "text encoder", **kwargs)
    model.to(device=_default_device(device), dtype=dtype)
    return model, tokenizer


class SentenceEmbeddingSimilarity:
    """Cosine similarity of mean-pooled (over non-padding tokens), L2-normalised sentence
    embeddings, as sentence-transformers models are used.

    Args:
        model, tokenizer: a transformers encoder (``AutoModel``) and its tokenizer.
    """

    def __init__(self, model, tokenizer, max_length: int = 128):
        self.encoder = _TextEncoder(model, tokenizer, layer=None, max_length=max_length)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_SENTENCE_MODEL, device=None, dtype=None, **kwargs):
        model, tokenizer = _load_text_encoder(name_or_path, device, dtype, **kwargs)
        return cls(model, tokenizer)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        states, attention, _ = self.encoder.encode(texts)
        mask = attention.unsqueeze(-1).float()
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)

    def __call__(self, candidates: Sequence[str], references: Sequence[str]) -> torch.Tensor:
        _check_pairs(candidates, references)
        emb = self.embed(list(candidates) + list(references))
        n = len(candidates)
        return (emb[:n] * emb[n:]).sum(-1).cpu()


class BertScoreRecall:
    """BERTScore (Zhang et al. 2020) with greedy matching of contextual token embeddings.

    Recall: each reference token is matched to its most similar candidate token, and the cosine
    similarities are averaged over the reference tokens; precision swaps the roles; F1 combines
    them. Special tokens ([CLS], [SEP]...) are left out, as bert_score does; no idf weighting and
    no baseline rescaling (the DDPO reference used neither).

    For the alignment reward the candidate is the VLM's description and the reference the prompt:
    recall asks "how much of the prompt does the description cover".

    Args:
        model, tokenizer: a transformers encoder and its tokenizer.
        layer: which hidden state to use (index into ``hidden_states``; ``None``: the last).
        metric: ``"recall"``, ``"precision"`` or ``"f1"``.
    """

    def __init__(self, model, tokenizer, layer: int | None = None, metric: str = "recall", max_length: int = 128):
        if metric not in ("recall", "precision", "f1"):
            raise ValueError(f"metric must be 'recall', 'precision' or 'f1', got {metric!r}")
        self.encoder = _TextEncoder(model, tokenizer, layer=layer, max_length=max_length)
        self.metric = metric

    @classmethod
    def from_pretrained(
        cls, name_or_path: str = DEFAULT_BERTSCORE_MODEL, device=None, dtype=None, layer: int | None = -1, **kwargs
    ):
        """``layer=-1`` picks bert_score's tuned layer for known encoders (last layer otherwise)."""
        model, tokenizer = _load_text_encoder(name_or_path, device, dtype)
        if layer == -1:
            layer = BERTSCORE_LAYERS.get(str(name_or_path))
        return cls(model, tokenizer, layer=layer, **kwargs)

    def precision_recall_f1(
        self, candidates: Sequence[str], references: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_pairs(candidates, references)
        n = len(candidates)
        states, _, content = self.encoder.encode(list(candidates) + list(references))
        states = F.normalize(states, dim=-1)
        cand, ref = states[:n], states[n:]
        cand_mask, ref_mask = content[:n], content[n:]
        sim = torch.einsum("bid,bjd->bij", cand, ref)  # [B, Lc, Lr]
        neg = torch.finfo(sim.dtype).min
        sim = sim.masked_fill(~cand_mask.unsqueeze(-1), neg).masked_fill(~ref_mask.unsqueeze(1), neg)
        best_for_ref = sim.max(dim=1).values  # [B, Lr]
        best_for_cand = sim.max(dim=2).values  # [B, Lc]
        recall = (best_for_ref * ref_mask).sum(-1) / ref_mask.sum(-1).clamp_min(1)
        precision = (best_for_cand * cand_mask).sum(-1) / cand_mask.sum(-1).clamp_min(1)
        # empty texts (no content token) score 0
        recall = torch.where(ref_mask.any(-1) & cand_mask.any(-1), recall, torch.zeros_like(recall))
        precision = torch.where(ref_mask.any(-1) & cand_mask.any(-1), precision, torch.zeros_like(precision))
        f1 = 2 * precision * recall / (precision + recall).where(precision + recall != 0, torch.ones_like(recall))
        return precision.cpu(), recall.cpu(), f1.cpu()

    def __call__(self, candidates: Sequence[str], references: Sequence[str]) -> torch.Tensor:
        p, r, f = self.precision_recall_f1(candidates, references)
        return {"precision": p, "recall": r, "f1": f}[self.metric]


def _check_pairs(candidates: Sequence[str], references: Sequence[str]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")


class VLMAlignmentReward:
    """Reward = ``similarity(captioner(images), prompts)``: how well a VLM's description of the
    image matches the prompt.

    Args:
        captioner: any :class:`Captioner`.
        similarity: any :class:`TextSimilarity`.

    ``reward(images, prompts)`` returns float32 [B] on ``images.device``;
    :meth:`score_with_captions` also returns the captions (for logging).
    """

    def __init__(self, captioner: Captioner, similarity: TextSimilarity):
        self.captioner = captioner
        self.similarity = similarity

    def score_with_captions(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        captions = self.captioner(images)
        scores = torch.as_tensor(self.similarity(captions, list(prompts)), dtype=torch.float32)
        return scores.to(images.device), captions

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.score_with_captions(images, prompts)[0]


@register_reward("vlm_alignment", "blip_alignment")
def make_vlm_alignment_reward(
    captioner: str | Captioner = DEFAULT_BLIP_MODEL,
    similarity: str | TextSimilarity = "bertscore",
    similarity_model: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    asynchronous: bool = False,
    max_workers: int = 1,
    captioner_kwargs: dict[str, Any] | None = None,
    similarity_kwargs: dict[str, Any] | None = None,
) -> VLMAlignmentReward | AsyncReward:
    """The DDPO prompt-image alignment reward with an open VLM.

    Args:
        captioner: a BLIP hub id / local directory, or any :class:`Captioner`.
        similarity: ``"bertscore"`` (BERTScore recall, as the paper), ``"sentence"`` (sentence
            embedding cosine), or any :class:`TextSimilarity`.
        similarity_model: hub id / directory of the text encoder (defaults:
            ``microsoft/deberta-xlarge-mnli`` for bertscore, ``all-MiniLM-L6-v2`` for sentence).
        device, dtype: for the models loaded here (dtype: a torch dtype or its name, e.g. ``"float16"``).
        asynchronous: wrap the reward in :class:`AsyncReward` (``.submit()`` returns futures).
        max_workers: threads of the async pool.
        captioner_kwargs, similarity_kwargs: extra arguments of the ``from_pretrained`` loaders.

    Registered as ``"vlm_alignment"`` (alias ``"blip_alignment"``).
    """
    dtype = resolve_dtype(dtype)
    if isinstance(captioner, (str, os.PathLike)):
        captioner = BlipCaptioner.from_pretrained(
            os.fspath(captioner), device=device, dtype=dtype, **(captioner_kwargs or {})
        )
    if isinstance(similarity, str):
        if similarity == "bertscore":
            similarity = BertScoreRecall.from_pretrained(
                similarity_model or DEFAULT_BERTSCORE_MODEL, device=device, **(similarity_kwargs or {})
            )
        elif similarity == "sentence":
            similarity = SentenceEmbeddingSimilarity.from_pretrained(
                similarity_model or DEFAULT_SENTENCE_MODEL, device=device, **(similarity_kwargs or {})
            )
        else:
            raise ValueError(f"similarity must be 'bertscore', 'sentence' or a TextSimilarity, got {similarity!r}")
    reward = VLMAlignmentReward(captioner, similarity)
    return AsyncReward(reward, max_workers=max_workers) if asynchronous else reward
