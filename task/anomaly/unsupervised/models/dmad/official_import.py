"""Importing the official DMAD-PPDM release ({offset, bn, decoder}), read with ``torch.load(weights_only=True)``.

Official parameter names are mapped onto our modules; the official layers carry a few parameters their forward never
uses, which are reported and ignored. This toolkit's own checkpoints are the engine's business (checkpoints.py).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from torch import Tensor

from task.common.config import Config
from task.common.errors import UserError

from .encoder import BACKBONES

log = logging.getLogger("dmad")

OFFICIAL_KEYS = {"offset", "bn", "decoder"}

# Official parameters that exist in the file but that no official forward ever reads: (part, pattern, why).
_OFFICIAL_UNUSED: list[tuple[str, str, str]] = [
    # conv_offset1.0 and .3 are CoordConv2d, a Conv2d subclass whose forward runs its inner .conv; indices 1 and
    # 4 are BatchNorms whose weight/bias are used, so only 0 and 3 may be dropped.
    (
        "offset",
        r"^conv_offset1\.[03]\.(weight|bias)$",
        "CoordConv2d's inherited Conv2d weight/bias (its forward uses .conv)",
    ),
    ("bn", r"^(conv4|bn4)\.", "conv4/bn4 are built in BN_layer but never called in its forward"),
]
# (official pattern, our replacement) per official sub-dict.
_OFFICIAL_RULES: dict[str, list[tuple[str, str]]] = {
    "offset": [
        (r"^conv_offset1\.", "stem."),
        (r"^conv_offset2\.0\.convs\.", "refine.0.body."),
        (r"^conv_offset2\.1\.", "refine.1."),
        (r"^conv_offset3_\.", "fine_inverse_head."),
        (r"^conv_offset4_\.", "coarse_inverse_head."),
        (r"^conv_offset3\.", "fine_head."),
        (r"^conv_offset4\.", "coarse_head."),
    ],
    "bn": [
        (r"^conv([123])_r\.", "reduce.{0}.0."),
        (r"^bn([123])_r\.", "reduce.{0}.1."),
        (r"^conv1\.", "down1.0.0."),
        (r"^bn1\.", "down1.0.1."),
        (r"^conv2\.", "down1.1.0."),
        (r"^bn2\.", "down1.1.1."),
        (r"^conv3\.", "down2.0."),
        (r"^bn3\.", "down2.1."),
        (r"^vq3\.embedding\.", "quantizer.codebook."),
        (r"^bn_layer\.", "fuse."),
    ],
    "decoder": [(r"^", "")],
}
# The official code's fixed settings; other values change what an official checkpoint computes.
OFFICIAL_SETTINGS = {
    "DATASET.resize": [256, 256],
    "MODEL.coarse_shift": 8 / 256,
    "MODEL.fine_shift": 3 / 256,
    "MODEL.sigma": 4.0,
}
_OUR_PREFIX = {"offset": "deformation.", "bn": "bottleneck.", "decoder": "decoder."}


def _unused_reason(part: str, key: str) -> str | None:
    return next((why for p, pattern, why in _OFFICIAL_UNUSED if p == part and re.match(pattern, key)), None)


def _rename(part: str, key: str) -> str:
    for pattern, replacement in _OFFICIAL_RULES[part]:
        match = re.match(pattern, key)
        if match:
            if "{0}" in replacement:
                replacement = replacement.format(int(match.group(1)) - 1)
            return _OUR_PREFIX[part] + replacement + key[match.end() :]
    return _OUR_PREFIX[part] + key


def _official_part(state: dict, part: str) -> dict[str, Tensor]:
    """One official sub-dict with a DataParallel ``module.`` prefix removed."""
    return {k.removeprefix("module."): v for k, v in state[part].items()}


def convert_official(state: dict[str, dict[str, Tensor]]) -> tuple[dict[str, Tensor], list[tuple[str, str]]]:
    """Official {offset, bn, decoder} -> (our state-dict entries, [(ignored official key, why), ...])."""
    converted: dict[str, Tensor] = {}
    ignored: list[tuple[str, str]] = []
    for part in ("offset", "bn", "decoder"):
        for key, value in _official_part(state, part).items():
            why = _unused_reason(part, key)
            if why is not None:
                ignored.append((f"{part}.{key}", why))
            else:
                converted[_rename(part, key)] = value
    return converted, ignored


def describe_official(state: dict) -> dict[str, object]:
    """The config an official checkpoint needs, read from its tensors: {MODEL.backbone, MODEL.vq,
    MODEL.vq_num_embeddings}.

    The backbone is recognised from the decoder's layer3 (block count and bottleneck width); None if unknown.
    """
    bn, decoder = _official_part(state, "bn"), _official_part(state, "decoder")
    codebook = bn.get("vq3.embedding.weight")
    blocks = len({k.split(".")[1] for k in decoder if k.startswith("layer3.")})
    conv1 = decoder.get("layer3.0.conv1.weight")
    width = conv1.shape[0] if "layer3.0.conv3.weight" in decoder and isinstance(conv1, Tensor) else None
    backbone = next(
        (
            name
            for name, spec in BACKBONES.items()
            if spec.expansion == 4 and spec.layers[2] == blocks and spec.width_per_group == width
        ),
        None,
    )
    described: dict[str, object] = {"MODEL.backbone": backbone, "MODEL.vq": isinstance(codebook, Tensor)}
    if isinstance(codebook, Tensor):
        described["MODEL.vq_num_embeddings"] = int(codebook.shape[0])
    return described


def _override(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_official(state: dict, path: str | Path, cfg: Config) -> None:
    """Raise a one-line UserError when the official ``state`` needs other settings than ``cfg`` (before building)."""
    needed = {k: v for k, v in describe_official(state).items() if v is not None}
    changed = {k: v for k, v in needed.items() if cfg.get(k) != v}
    if changed:
        found = ", ".join(f"{k}={_override(cfg.get(k))}" for k in changed)
        fix = " ".join(f"{k}={_override(v)}" for k, v in changed.items())
        raise UserError(f"official checkpoint {path} needs {fix} but the config has {found}; pass {fix}")


def is_official(state: dict) -> bool:
    return (
        "format" not in state and OFFICIAL_KEYS <= set(state) and all(isinstance(state[k], dict) for k in OFFICIAL_KEYS)
    )


def log_official_load(
    path: str | Path, cfg: Config, entries: dict[str, Tensor], ignored: list[tuple[str, str]], state: dict
) -> None:
    described = describe_official(state)
    counts = {prefix.rstrip("."): sum(k.startswith(prefix) for k in entries) for prefix in _OUR_PREFIX.values()}
    encoder = cfg.MODEL.backbone_weights or (
        "torchvision IMAGENET1K_V1 weights (as the official code)"
        if cfg.MODEL.pretrained
        else "random init (MODEL.pretrained=false)"
    )
    log.info(
        "loaded official DMAD-PPDM checkpoint %s (%s): %d tensors into %s; encoder from %s",
        path,
        ", ".join(f"{k}={_override(v)}" for k, v in described.items()),
        len(entries),
        ", ".join(f"{k} ({n})" for k, n in counts.items()),
        encoder,
    )
    by_reason: dict[str, list[str]] = {}
    for key, why in ignored:
        by_reason.setdefault(why, []).append(key)
    for why, keys in by_reason.items():
        log.info("ignored %d official tensors, %s: %s", len(keys), why, ", ".join(keys))
    log.info("official checkpoints hold no score statistics; they are measured on the training images")
    differ = [
        f"{k}={_override(cfg.get(k))} (official: {_override(v)})"
        for k, v in OFFICIAL_SETTINGS.items()
        if cfg.get(k) != v
    ]
    if differ:
        log.warning(
            "settings differ from the official evaluation, so results are not comparable with the published ones: %s",
            ", ".join(differ),
        )
