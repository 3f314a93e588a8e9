"""Loading DMAD weights: this toolkit's checkpoints and the official DMAD-PPDM release ({offset, bn, decoder}).

Both load with ``torch.load(weights_only=True)``. Official parameter names are mapped onto our modules; the
official layers carry a few parameters their forward never uses, which are reported and ignored.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import Tensor

from task.common.config import Config
from task.common.errors import UserError
from task.common.io import load_checkpoint

from .torch_model import DMADModel

log = logging.getLogger("dmad")

CHECKPOINT_FORMAT = "tnvision-dmad"
OFFICIAL_KEYS = {"offset", "bn", "decoder"}
# Keys whose mismatch makes a checkpoint unusable with the current config.
COMPATIBILITY_KEYS = ("MODEL.backbone", "MODEL.vq", "MODEL.vq_num_embeddings", "DATASET.resize")

# (official pattern, our replacement) per official sub-dict; None = present in the file but unused upstream.
_OFFICIAL_RULES: dict[str, list[tuple[str, str | None]]] = {
    "offset": [
        # CoordConv2d subclasses Conv2d, so it owns a weight/bias its forward never uses (it uses .conv).
        (r"^conv_offset1\.(\d+)\.(weight|bias)$", None),
        (r"^conv_offset1\.", "stem."),
        (r"^conv_offset2\.0\.convs\.", "refine.0.body."),
        (r"^conv_offset2\.1\.", "refine.1."),
        (r"^conv_offset3_\.", "fine_inverse_head."),
        (r"^conv_offset4_\.", "coarse_inverse_head."),
        (r"^conv_offset3\.", "fine_head."),
        (r"^conv_offset4\.", "coarse_head."),
    ],
    "bn": [
        # conv4/bn4 are built in the VQ bottleneck but never called in its forward.
        (r"^(conv4|bn4)\.", None),
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
_OUR_PREFIX = {"offset": "deformation.", "bn": "bottleneck.", "decoder": "decoder."}


def _rename(part: str, key: str) -> str | None:
    for pattern, replacement in _OFFICIAL_RULES[part]:
        match = re.match(pattern, key)
        if match:
            if replacement is None:
                return None
            if "{0}" in replacement:
                replacement = replacement.format(int(match.group(1)) - 1)
            return _OUR_PREFIX[part] + replacement + key[match.end() :]
    return _OUR_PREFIX[part] + key


def convert_official(state: dict[str, dict[str, Tensor]]) -> tuple[dict[str, Tensor], list[str]]:
    """Official {offset, bn, decoder} -> (our state-dict entries, ignored official keys)."""
    converted: dict[str, Tensor] = {}
    ignored: list[str] = []
    for part in ("offset", "bn", "decoder"):
        for key, value in state[part].items():
            if key.startswith("module."):
                key = key[len("module.") :]
            new = _rename(part, key)
            if new is None:
                ignored.append(f"{part}.{key}")
            else:
                converted[new] = value
    return converted, ignored


def _load_strict(model: DMADModel, entries: dict[str, Tensor], source: str, expect_all_except: tuple[str, ...] = ()) -> None:
    own = model.state_dict()
    unexpected = [k for k in entries if k not in own]
    wrong = [k for k in entries if k in own and tuple(entries[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in entries and not k.startswith(expect_all_except)]
    if unexpected or wrong or missing:
        detail = (
            f"shape mismatch at {wrong[0]} ({tuple(entries[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)})" if wrong
            else f"unexpected {unexpected[:2]}" if unexpected else f"missing {missing[:2]}"
        )
        raise UserError(f"{source} does not fit the configured model ({detail}); check MODEL.backbone and MODEL.vq")
    model.load_state_dict(entries, strict=False)


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's content (weights_only); a file that is not a dict is a UserError."""
    state = load_checkpoint(path, "checkpoint")
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a DMAD checkpoint (it holds a {type(state).__name__})")
    return state


def is_official(state: dict) -> bool:
    return state.get("format") != CHECKPOINT_FORMAT and OFFICIAL_KEYS <= set(state) and all(isinstance(state[k], dict) for k in OFFICIAL_KEYS)


def load_any_checkpoint(model: DMADModel, state: dict, path: str | Path, cfg: Config) -> tuple[dict[str, float], bool]:
    """Load a checkpoint's ``state`` into ``model``. Returns (thresholds, whether score statistics came with it)."""
    if state.get("format") == CHECKPOINT_FORMAT:
        saved = Config(state["config"])
        changed = [f"{k}={saved.get(k)!r} (config: {cfg.get(k)!r})" for k in COMPATIBILITY_KEYS if saved.get(k) != cfg.get(k)]
        if changed:
            raise UserError(f"checkpoint {path} was trained with {', '.join(changed)}; pass matching KEY=VALUE overrides")
        _load_strict(model, state["state_dict"], f"checkpoint {path}")
        return dict(state.get("thresholds") or {}), bool(state.get("thresholds"))
    if is_official(state):
        entries, ignored = convert_official(state)
        # The official file holds no encoder (it is torchvision's ImageNet model) and no score statistics.
        _load_strict(model, entries, f"official checkpoint {path}", expect_all_except=("encoder.", "score_stats", "deform_weight"))
        log.info("loaded official DMAD-PPDM checkpoint %s: %d tensors (offset, bn, decoder); encoder from %s",
                 path, len(entries), cfg.MODEL.backbone_weights or ("torchvision ImageNet weights" if cfg.MODEL.pretrained else "random init"))
        if ignored:
            log.info("ignored %d tensors the official forward never uses: %s", len(ignored), ", ".join(ignored))
        return {}, False
    raise UserError(f"{path} is neither a DMAD checkpoint of this toolkit nor an official DMAD-PPDM one (keys: {sorted(state)[:5]})")
