"""DMAD-PDM (video, future-frame prediction) configuration: the MODEL section schema and the official presets.

The official code ships three near-copies of the model (ped2, avenue, shanghai); every difference between them
is a key below, so one implementation covers all three. ``PRESETS`` lists the official values per dataset, section
by section (MODEL keys follow ``MODEL_SCHEMA``; the other sections name what the official training scripts set).

Official presets (Train_*.py / Evaluate_*.py / model/final_future_prediction_*.py):

| key                         | ped2             | avenue             | shanghaitech              |
|-----------------------------|------------------|--------------------|---------------------------|
| frames read as              | BGR              | gray, x3 channels  | gray, x3 channels         |
| widths (encoder / decoder)  | 32,64,128,256    | 64,128,256,512     | 64,128,256,512            |
| skip width (dim/skip_ratio) | 32               | 64                 | 16                        |
| memory size x dim           | 200 x 256        | 420 x 512          | 1000 x 512                |
| coarse / fine shift (px)    | 2 / 3            | 3 / 3              | 2 / 3                     |
| coarse field head strides   | 1,2,2            | 2,2,1              | 2,2,1                     |
| field smoothness filter     | separable        | box                | box                       |
| field magnitude weight      | 0.4              | 1                  | 1 (foreground-weighted)   |
| warped-frame gradient wt    | 0.25             | 1                  | 1                         |
| background                  | 1 template       | 1 template         | 1 per video, encoder input|
| composition mask            | encoder, C ch.   | encoder, C ch.     | decoder, 1 ch.            |
| background loss             | plain MSE        | plain MSE          | masked + mask entropy     |
| scores                      | y-field 7x18 max, L1, | y-field 6x18, MSE, | |field| 6x18, MSE 42x31, |
|                             | grad 16x14       | grad 16x14         | object                    |
| AdamW lr / epochs / batch   | 2e-4 / 60 / 8    | 2e-4 / 60 / 8      | 2e-4 / 10 / 8             |
| background lr               | 50x, 20x from epoch 6 | 50x, 20x from epoch 6 | 10x                  |

The "gray, x3 channels" datasets are read as grayscale and replicated to three channels by the official loader,
so their official model has ``channels=3``; ``channels=1`` is this toolkit's cheaper single-channel variant.
"""

from __future__ import annotations

from typing import Any

from task.common.config import F, Schema

DATASETS = ("ped2", "avenue", "shanghaitech")

MODEL_SCHEMA: Schema = {
    "channels": F(int, 3, choices=(1, 3), help="image channels the model reads and predicts"),
    "clip_length": F(int, 4, min=1, help="input frames per clip; the model predicts the next one"),
    "memory_size": F(int, 200, min=1, help="prototypes in the vector-quantised memory"),
    "memory_dim": F(
        int,
        256,
        min=8,
        multiple_of=8,
        help="prototype dimension = deepest encoder width; widths are dim/8, dim/4, dim/2, dim",
    ),
    "skip_ratio": F(int, 8, min=1, help="skip-connection width is memory_dim / skip_ratio"),
    "vq_beta": F(float, 0.25, min=0, help="commitment weight inside the VQ loss"),
    "coarse_shift": F(float, 2.0, min=0, help="largest coarse displacement in pixels"),
    "fine_shift": F(float, 3.0, min=0, help="largest fine displacement in pixels"),
    "pdm_width": F(
        int, 64, min=4, max=512, help="channels of the deformation module's full-resolution convs (official: 64)"
    ),
    "coarse_strides": F(
        list, [1, 2, 2], length=3, item_type=int, min=1, max=2, help="strides of the coarse field head's three convs"
    ),
    "num_backgrounds": F(int, 1, min=1, nullable=True, help="background templates; null: one per video (ShanghaiTech)"),
    "background_input": F(bool, False, help="append the clip's background template to the encoder and PDM input"),
    "mask_source": F(
        str,
        "encoder",
        choices=("encoder", "decoder"),
        help="encoder: C-channel mask from the encoder; decoder: 1-channel mask multiplied into the prototype",
    ),
    # Loss weights: total = mse(warped) + mse(prediction) + gradient_weight * (grad(prediction) + warped_gradient_weight
    #   * grad(warped)) + vq_weight * vq + field_weight * (field_magnitude_weight * |fields| + smoothness_weight *
    #   smoothness) + background term.
    "gradient_weight": F(float, 1.0, min=0),
    "warped_gradient_weight": F(float, 0.25, min=0, help="weight of the coarse-warped frame's gradient loss"),
    "vq_weight": F(float, 1.0, min=0),
    "field_weight": F(float, 0.25, min=0),
    "field_magnitude_weight": F(float, 0.4, min=0),
    "smoothness_weight": F(float, 1.0, min=0),
    "smoothness": F(
        str, "separable", choices=("separable", "box"), help="field smoothness filter: 1-D along x and y, or 2-D box"
    ),
    "coarse_smooth_kernel": F(int, 7, min=3, help="odd kernel size of the coarse field's smoothness filter"),
    "fine_smooth_kernel": F(int, 3, min=3, help="odd kernel size of the fine field's smoothness filter"),
    "foreground_weighting": F(bool, False, help="weight pixel losses by 1 + 100 * local distance to the background"),
    "background_loss": F(
        str,
        "plain",
        choices=("plain", "masked"),
        help="plain: MSE(template, frame); masked: outside the mask, plus mask entropy",
    ),
    # Per-frame scores as the official evaluation computes them.
    "deformation_field": F(
        str, "vertical", choices=("vertical", "magnitude"), help="coarse-field channel the deformation score reads"
    ),
    "deformation_window": F(
        list, [7, 18], length=2, item_type=int, min=1, help="[h, w] of the deformation score's box filter"
    ),
    "prediction_score": F(
        str,
        "l1",
        choices=("l1", "mse", "window"),
        help="mean |error|, mean squared error, or max box-mean of squared error",
    ),
    "prediction_window": F(
        list, [42, 31], length=2, item_type=int, min=1, help="[h, w] box for prediction_score=window"
    ),
    "gradient_window": F(
        list, [16, 14], length=2, item_type=int, min=1, help="[h, w] of the gradient score's box filter"
    ),
    "object_score": F(bool, False, help="also score the mean error inside each mask blob (ShanghaiTech)"),
}

# Official values that the lead's OPTIMIZER / TRAIN / DATALOADER / DATASET sections should carry.
# background_lr_late_factor: from epoch index ``background_lr_switch_epoch`` on, the official ped2/avenue scripts
# overwrite the background group's lr with ``late_factor * lr`` after every scheduler step (a constant, so the cosine
# schedule no longer applies to it); ShanghaiTech keeps the cosine-annealed 10x.
_COMMON_MODEL = {
    "clip_length": 4,
    "pdm_width": 64,
    "vq_beta": 0.25,
    "gradient_weight": 1.0,
    "vq_weight": 1.0,
    "field_weight": 0.25,
    "smoothness_weight": 1.0,
    "coarse_smooth_kernel": 7,
    "fine_smooth_kernel": 3,
    "gradient_window": [16, 14],
}
_AVENUE_MODEL = {
    **_COMMON_MODEL,
    "channels": 3,
    "memory_size": 420,
    "memory_dim": 512,
    "skip_ratio": 8,
    "coarse_shift": 3.0,
    "fine_shift": 3.0,
    "coarse_strides": [2, 2, 1],
    "num_backgrounds": 1,
    "background_input": False,
    "mask_source": "encoder",
    "warped_gradient_weight": 1.0,
    "field_magnitude_weight": 1.0,
    "smoothness": "box",
    "foreground_weighting": False,
    "background_loss": "plain",
    "deformation_field": "vertical",
    "deformation_window": [6, 18],
    "prediction_score": "mse",
    "prediction_window": [42, 31],
    "object_score": False,
}
_OPTIMIZER = {"name": "adamw", "lr": 2e-4, "betas": [0.9, 0.999], "weight_decay": 0.01, "scheduler": "cosine_per_epoch"}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "ped2": {
        "MODEL": {
            **_AVENUE_MODEL,
            "memory_size": 200,
            "memory_dim": 256,
            "coarse_shift": 2.0,
            "coarse_strides": [1, 2, 2],
            "warped_gradient_weight": 0.25,
            "field_magnitude_weight": 0.4,
            "smoothness": "separable",
            "deformation_window": [7, 18],
            "prediction_score": "l1",
        },
        "OPTIMIZER": {
            **_OPTIMIZER,
            "background_lr_factor": 50.0,
            "background_lr_late_factor": 20.0,
            "background_lr_switch_epoch": 6,
        },
        "TRAIN": {"epochs": 60, "seed": 2021},
        "DATALOADER": {"batch_size": 8},
        "DATASET": {"grayscale": False, "resize": [256, 256]},
    },
    "avenue": {
        "MODEL": dict(_AVENUE_MODEL),
        "OPTIMIZER": {
            **_OPTIMIZER,
            "background_lr_factor": 50.0,
            "background_lr_late_factor": 20.0,
            "background_lr_switch_epoch": 6,
        },
        "TRAIN": {"epochs": 60, "seed": 2021},
        "DATALOADER": {"batch_size": 8},
        "DATASET": {"grayscale": True, "resize": [256, 256]},
    },
    "shanghaitech": {
        "MODEL": {
            **_AVENUE_MODEL,
            "memory_size": 1000,
            "skip_ratio": 32,
            "coarse_shift": 2.0,
            "num_backgrounds": None,
            "background_input": True,
            "mask_source": "decoder",
            "foreground_weighting": True,
            "background_loss": "masked",
            "deformation_field": "magnitude",
            "prediction_score": "window",
            "object_score": True,
        },
        "OPTIMIZER": {
            **_OPTIMIZER,
            "background_lr_factor": 10.0,
            "background_lr_late_factor": None,
            "background_lr_switch_epoch": None,
        },
        "TRAIN": {"epochs": 10, "seed": 2021},
        "DATALOADER": {"batch_size": 8},
        "DATASET": {"grayscale": True, "resize": [256, 256]},
    },
}
