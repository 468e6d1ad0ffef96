"""The LAION aesthetic predictor as a reward: CLIP ViT-L/14 image embedding + a small MLP.

The DDPO paper's aesthetic-quality reward is the LAION "improved aesthetic predictor"
(``sac+logos+ava1-l14-linearMSE.pth``): the L2-normalised image embedding of OpenAI's CLIP
ViT-L/14 (768-d) goes through a 5-layer linear MLP that predicts a 1-10 rating.

:class:`AestheticMLP` has exactly the published module layout (``layers.0`` ... ``layers.7``,
dropouts at 1, 3, 5), so the published state dict loads with ``strict=True``.
:class:`AestheticScorer` runs CLIP + MLP on image batches in [0, 1], on its own device, in
chunks. :func:`make_aesthetic_reward` builds one from a weights path/URL and a CLIP hub id or
directory.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ddpo_rl.hub import PretrainedWeightsNotFoundError, looks_like_local_path
from ddpo_rl.precision import resolve_dtype
from ddpo_rl.rewards._clip_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess_images
from ddpo_rl.rewards.registry import register_reward

AESTHETIC_MLP_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
    "sac%2Blogos%2Bava1-l14-linearMSE.pth"
)
"""Where the published predictor head lives (1 MB ``torch.save`` of the MLP's state dict)."""

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
"""The CLIP the predictor was trained on (ViT-L/14, 768-d image embeddings)."""


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head: 768 -> 1024 -> 128 -> 64 -> 16 -> 1, linear layers
    with dropout and no activations, held in ``self.layers`` so that the published state dict
    (keys ``layers.{0,2,4,6,7}.{weight,bias}``) loads strictly."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    @property
    def embed_dim(self) -> int:
        return self.layers[0].in_features

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings [B, D] -> scores [B, 1]."""
        return self.layers(embeddings)


def load_aesthetic_state_dict(weights: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The predictor head's state dict from a local file, an http(s) URL (downloaded once to the
    torch hub cache) or a mapping.

    Raises:
        PretrainedWeightsNotFoundError: the file does not exist or the download failed.
    """
    if isinstance(weights, Mapping):
        return dict(weights)
    weights = os.fspath(weights)
    if weights.startswith(("http://", "https://")):
        try:
            state = torch.hub.load_state_dict_from_url(weights, map_location="cpu", progress=False, weights_only=True)
        except Exception as err:  # URLError, HTTPError, OSError...: all mean "could not get it"
            raise PretrainedWeightsNotFoundError(
                f"could not download the aesthetic predictor weights from {weights} ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:150] if str(err) else ''}); download the file yourself and pass its "
                "local path as weights=..."
            ) from err
    else:
        path = os.path.expanduser(weights)
        if not os.path.isfile(path):
            raise PretrainedWeightsNotFoundError(
                f"aesthetic predictor weights not found at '{path}'; download {AESTHETIC_MLP_URL} "
                "and pass its path (or the URL) as weights=..."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, nn.Module):  # pragma: no cover - a pickled module rather than a state dict
        state = state.state_dict()
    return dict(state)


def load_clip_model(name_or_path: str = DEFAULT_CLIP_MODEL, **kwargs):
    """A transformers ``CLIPModel`` from a hub id or a local directory; frozen, eval (as the DDPO
    reference loads ``openai/clip-vit-large-patch14``).

    Raises:
        PretrainedWeightsNotFoundError: the model could not be loaded.
    """
    from transformers import CLIPModel

    if looks_like_local_path(str(name_or_path)) and not os.path.isdir(os.path.expanduser(str(name_or_path))):
        raise PretrainedWeightsNotFoundError(
            f"CLIP model directory '{name_or_path}' does not exist; pass a hub id such as "
            f"'{DEFAULT_CLIP_MODEL}' or a directory written by CLIPModel.save_pretrained"
        )
    try:
        model = CLIPModel.from_pretrained(os.path.expanduser(str(name_or_path)), **kwargs)
    except (OSError, ValueError) as err:
        raise PretrainedWeightsNotFoundError(
            f"could not load CLIP from '{name_or_path}' ({str(err).splitlines()[0][:150] if str(err) else err!r}); "
            f"run `hf download {DEFAULT_CLIP_MODEL} --local-dir <dir>` and pass that directory "
            "(HF_HUB_OFFLINE=1 uses the local cache only)"
        ) from err
    return model.requires_grad_(False).eval()


def clip_image_embeddings(clip: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected CLIP image embeddings of a ``CLIPModel`` or ``CLIPVisionModelWithProjection``
    (``visual_projection(vision_model(x).pooler_output)``, the same as ``get_image_features``)."""
    pooled = clip.vision_model(pixel_values=pixel_values).pooler_output
    return clip.visual_projection(pooled)


class AestheticScorer(nn.Module):
    """Reward = LAION aesthetic score of each image.

    Args:
        clip: a transformers ``CLIPModel`` or ``CLIPVisionModelWithProjection``.
        mlp: an :class:`AestheticMLP` with loaded weights.
        batch_size: images per forward pass (memory bound; results do not depend on it).
        device: where the models run; ``None`` keeps them where they are.
        dtype: dtype of CLIP's forward (e.g. float16 on GPU); the MLP runs in float32.

    Call it as a reward function: ``scorer(images [B, 3, H, W] in [0, 1], prompts) -> [B]``
    (on the images' device; prompts are ignored).
    """

    def __init__(
        self,
        clip: nn.Module,
        mlp: AestheticMLP,
        batch_size: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        proj_dim = clip.visual_projection.out_features
        if proj_dim != mlp.embed_dim:
            raise ValueError(
                f"CLIP image embeddings are {proj_dim}-d but the aesthetic MLP expects {mlp.embed_dim}-d "
                "(the published predictor needs ViT-L/14)"
            )
        self.clip = clip.requires_grad_(False).eval()
        self.mlp = mlp.requires_grad_(False).eval().float()
        self.batch_size = int(batch_size)
        self.dtype = dtype
        vision_cfg = getattr(clip.config, "vision_config", clip.config)
        self.image_size = int(vision_cfg.image_size)
        if device is not None:
            self.to(device)
        if dtype is not None:
            self.clip.to(dtype=dtype)

    @property
    def device(self) -> torch.device:
        return next(self.mlp.parameters()).device

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP embeddings [B, D] (float32) of images in [0, 1]."""
        clip_dtype = next(self.clip.parameters()).dtype
        pixels = preprocess_images(images.to(self.device), self.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        emb = clip_image_embeddings(self.clip, pixels.to(clip_dtype)).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Aesthetic scores [B] (float32, on ``images.device``)."""
        scores = [self.mlp(self.embed(chunk)).squeeze(-1) for chunk in images.split(self.batch_size)]
        return torch.cat(scores).to(images.device)


@register_reward("aesthetic", "laion_aesthetic")
def make_aesthetic_reward(
    weights: str | os.PathLike | Mapping[str, torch.Tensor] = AESTHETIC_MLP_URL,
    clip_model: str | nn.Module = DEFAULT_CLIP_MODEL,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    batch_size: int = 32,
    clip_kwargs: dict[str, Any] | None = None,
) -> AestheticScorer:
    """The DDPO aesthetic reward.

    Args:
        weights: the predictor head: a local ``.pth`` path, a URL (default: the published file) or
            a state dict. Loaded with ``strict=True``.
        clip_model: CLIP hub id / local directory, or a ready CLIP module.
        device: defaults to CUDA when available.
        dtype: CLIP's dtype, a torch dtype or its name (``"float16"``, ``"bfloat16"``, ``"float32"``);
            defaults to float16 on CUDA, float32 otherwise.
        batch_size: images per CLIP forward.
        clip_kwargs: extra ``from_pretrained`` arguments (``revision``, ``local_files_only``...).

    Registered as ``"aesthetic"`` (alias ``"laion_aesthetic"``): from the command line,
    ``--reward aesthetic --reward-kwargs '{"weights": "/path/sac+logos+ava1-l14-linearMSE.pth",
    "clip_model": "/path/clip-vit-large-patch14"}'``.
    """
    dtype = resolve_dtype(dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    state = load_aesthetic_state_dict(weights)
    mlp = AestheticMLP(embed_dim=state["layers.0.weight"].shape[1] if "layers.0.weight" in state else 768)
    mlp.load_state_dict(state, strict=True)
    clip = clip_model if isinstance(clip_model, nn.Module) else load_clip_model(clip_model, **(clip_kwargs or {}))
    return AestheticScorer(clip, mlp, batch_size=batch_size, device=device, dtype=dtype)
