"""Frame metrics for world models on the toy world (DESIGN.md section 5).

* **fidelity**: PSNR, optionally restricted to the pixels a model could know (``known_mask``:
  world locations visible in the conditioning frame). ``ceiling_frames`` (the first frame moved
  by the exact camera motion) and ``floor_frames`` (the first frame frozen) bracket what a model
  can reach from the first frame alone.
* **action following**: the global translation between consecutive frames, measured by phase
  correlation, against the translation the actions command (``action_error_px``).

Everything is numpy; torch tensors are accepted and converted. Images are channels-last:
uint8 in [0, 255] or float in [0, 1].

Shape legend: T frames, H x W pixels (H = W = frame_size), C channels (3).
Shift convention: ``(dy, dx)`` is the motion of the *content*: ``b`` is ``a`` shifted by
``(dy, dx)`` when ``b[y, x] = a[y - dy, x - dx]``. The camera moving right by ``speed_px``
moves the content by ``(0, -speed_px)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from streamkd.data.toyworld import OBJECT_RGB, ToyWorldConfig, camera_offsets


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Accept numpy arrays and torch tensors (duck-typed, so this module never imports torch)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    return x


def _to_unit_float(x: Any, name: str) -> np.ndarray:
    """uint8 [0, 255] or float [0, 1] image data -> float64 in [0, 1]."""
    x = _to_numpy(x, name)
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 255.0
    if x.dtype.kind != "f":
        raise ValueError(f"{name} must be uint8 or float in [0, 1], got dtype {x.dtype}")
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(
            f"{name} is float with values in [{x.min():.4g}, {x.max():.4g}]; expected [0, 1]: "
            "clip it, rescale a [-1, 1] output with (x + 1) / 2, or pass uint8"
        )
    return x.astype(np.float64)


def _masked_sq_err(pred: Any, target: Any, mask: Any | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-pixel squared error summed over channels [..., H, W], the mask, and the channel count."""
    pred_f = _to_unit_float(pred, "pred")
    target_f = _to_unit_float(target, "target")
    if pred_f.shape != target_f.shape:
        raise ValueError(f"pred shape {pred_f.shape} != target shape {target_f.shape}")
    if pred_f.ndim < 3:
        raise ValueError(f"images must be channels-last [..., H, W, C], got shape {pred_f.shape}")
    sq_err = np.square(pred_f - target_f).sum(axis=-1)  # [..., H, W]
    if mask is None:
        mask_b = np.ones(sq_err.shape, dtype=bool)
    else:
        mask_b = _to_numpy(mask, "mask")
        if mask_b.dtype != np.bool_:
            raise ValueError(f"mask must be boolean, got dtype {mask_b.dtype}")
        if mask_b.shape not in (sq_err.shape, sq_err.shape[-2:]):
            raise ValueError(
                f"mask shape {mask_b.shape} fits neither the frames {sq_err.shape} "
                f"nor one frame {sq_err.shape[-2:]} of images {pred_f.shape}"
            )
        mask_b = np.broadcast_to(mask_b, sq_err.shape)
    return sq_err, mask_b, pred_f.shape[-1]


def _psnr_from(sq_err_sum: np.ndarray, count: np.ndarray) -> np.ndarray:
    mse = sq_err_sum / count
    with np.errstate(divide="ignore"):  # mse == 0 gives +inf: identical pixels
        return 10.0 * np.log10(1.0 / mse)


def psnr(pred: Any, target: Any, mask: Any | None = None) -> float:
    """PSNR in dB over all (or the masked) pixels; +inf when they are identical.

    pred, target: [..., H, W, C], uint8 or float in [0, 1]. mask: boolean, shaped like the
    images without C ([T, H, W]) or like one frame ([H, W], applied to every frame).
    """
    sq_err, mask_b, channels = _masked_sq_err(pred, target, mask)
    count = mask_b.sum()
    if count == 0:
        raise ValueError("mask selects no pixels; PSNR over nothing is undefined")
    return float(_psnr_from(sq_err[mask_b].sum(), count * channels))


def psnr_per_frame(pred: Any, target: Any, mask: Any | None = None) -> np.ndarray:
    """float64 [T]: PSNR of each frame in dB (+inf where identical).

    pred, target: [T, H, W, C]; mask as in ``psnr``. A frame whose mask is empty (e.g. the
    camera has left the first frame's view) gets NaN, so horizon curves keep one entry per
    frame; use ``np.nanmean`` to average. A mask that is empty in every frame raises.
    """
    sq_err, mask_b, channels = _masked_sq_err(pred, target, mask)
    if sq_err.ndim != 3:
        shape = (*sq_err.shape, channels)
        raise ValueError(f"psnr_per_frame needs frames [T, H, W, C], got shape {shape}")
    count_T = mask_b.sum(axis=(1, 2))
    if not count_T.any():
        raise ValueError("mask selects no pixels in any frame; PSNR over nothing is undefined")
    sq_sum_T = np.where(mask_b, sq_err, 0.0).sum(axis=(1, 2))
    with np.errstate(invalid="ignore"):  # 0 / 0 for empty frames -> NaN, as documented
        return _psnr_from(sq_sum_T, count_T * channels)


def _gray(x: Any, name: str) -> np.ndarray:
    """[..., H, W, C] images -> float64 [..., H, W] grayscale in [0, 1] (channel mean)."""
    return _to_unit_float(x, name).mean(axis=-1)


# L1 distance in [0, 1] RGB under which a pixel counts as object-coloured: the nearest landmark
# colour (red/blue) is at 0.9, so this leaves room for generated colours that are a bit off.
_OBJECT_COLOUR_TOL = 0.45
_OBJECT_DILATE_PX = 2


def _object_mask(frames_NHWC: np.ndarray) -> np.ndarray:
    """bool [N, H, W]: pixels of the toy world's moving objects, found by their reserved colour.

    Dilated by 2 px to cover the black outline and some blur in generated frames.
    """
    target = np.asarray(OBJECT_RGB, dtype=np.float64) / 255.0
    hit_NHW = np.abs(frames_NHWC - target).sum(axis=-1) < _OBJECT_COLOUR_TOL
    h, w = hit_NHW.shape[1:]
    r = _OBJECT_DILATE_PX
    padded = np.pad(hit_NHW, ((0, 0), (r, r), (r, r)))
    dilated = np.zeros_like(hit_NHW)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            dilated |= padded[:, dy : dy + h, dx : dx + w]
    return dilated


def _phase_correlation(a_NHW: np.ndarray, b_NHW: np.ndarray) -> np.ndarray:
    """float64 [N, 2]: content shift (dy, dx) from a[n] to b[n] for grayscale pairs."""
    n, h, w = a_NHW.shape
    window_HW = np.outer(np.hanning(h), np.hanning(w))

    def spectrum(x_NHW: np.ndarray) -> np.ndarray:
        return np.fft.rfft2((x_NHW - x_NHW.mean(axis=(1, 2), keepdims=True)) * window_HW)

    cross = np.conj(spectrum(a_NHW)) * spectrum(b_NHW)
    # The small floor only guards frequencies where both spectra vanish (e.g. flat frames).
    cross /= np.abs(cross) + 1e-12
    corr_NHW = np.fft.irfft2(cross, s=(h, w))
    shifts_N2 = np.empty((n, 2))
    for i, corr_HW in enumerate(corr_NHW):
        py, px = np.unravel_index(int(np.argmax(corr_HW)), corr_HW.shape)
        c = corr_HW[py, px]
        dy = py + _parabolic_offset(corr_HW[py - 1, px], c, corr_HW[(py + 1) % h, px])
        dx = px + _parabolic_offset(corr_HW[py, px - 1], c, corr_HW[py, (px + 1) % w])
        shifts_N2[i] = ((dy + h / 2) % h - h / 2, (dx + w / 2) % w - w / 2)
    return shifts_N2


def _parabolic_offset(left: float, centre: float, right: float) -> float:
    """Sub-sample offset in [-0.5, 0.5] of the vertex of the parabola through three samples."""
    denom = left - 2.0 * centre + right
    if denom >= 0.0:  # flat or not a maximum: keep the integer peak
        return 0.0
    return float(np.clip(0.5 * (left - right) / denom, -0.5, 0.5))


def phase_correlation_shift(a: Any, b: Any) -> tuple[float, float]:
    """Global translation (dy, dx) of the content from frame ``a`` to frame ``b``, sub-pixel.

    If ``b[y, x] = a[y - dy, x - dx]``, returns ``(dy, dx)``; each component is wrapped to
    [-N/2, N/2). a, b: [H, W, C] (or [H, W]) uint8 or float in [0, 1]. Method: grayscale, mean
    removed, Hann window (so the frame border is not taken for an edge), normalized cross-power
    spectrum ``conj(A) B / |conj(A) B|`` whose inverse FFT peaks at the shift, then a parabolic
    fit through the peak and its neighbours on each axis.
    """
    a_np, b_np = _to_numpy(a, "a"), _to_numpy(b, "b")
    if a_np.shape != b_np.shape:
        raise ValueError(f"a shape {a_np.shape} != b shape {b_np.shape}")
    if a_np.ndim == 2:
        a_HW, b_HW = _to_unit_float(a_np, "a"), _to_unit_float(b_np, "b")
    elif a_np.ndim == 3:
        a_HW, b_HW = _gray(a_np, "a"), _gray(b_np, "b")
    else:
        raise ValueError(f"a and b must be images [H, W, C] or [H, W], got shape {a_np.shape}")
    dy, dx = _phase_correlation(a_HW[None], b_HW[None])[0]
    return float(dy), float(dx)


def frame_shifts(frames: Any, exclude_objects: bool = True) -> np.ndarray:
    """float64 [T-1, 2]: phase-correlation content shift (dy, dx) from frame t-1 to frame t.

    frames: [T, H, W, 3], uint8 or float in [0, 1]. With ``exclude_objects`` the toy world's
    moving objects (``OBJECT_RGB``) are painted out first: they move on their own, and in a
    view with few landmarks their sharp edges would otherwise outvote the camera motion (on
    ground-truth episodes this takes the mean error from about 0.25 px to about 0.005 px).
    """
    frames_THWC = _to_unit_float(frames, "frames")
    if frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3 or len(frames_THWC) < 2:
        raise ValueError(f"frames must be [T, H, W, 3] with T >= 2, got shape {frames_THWC.shape}")
    gray_THW = frames_THWC.mean(axis=-1)
    if exclude_objects:
        # Fill with each frame's mean over the rest: zero after mean removal, so no edges.
        objects_THW = _object_mask(frames_THWC)
        keep_THW = ~objects_THW
        fill_T = (gray_THW * keep_THW).sum(axis=(1, 2)) / np.maximum(keep_THW.sum(axis=(1, 2)), 1)
        gray_THW = np.where(objects_THW, fill_T[:, None, None], gray_THW)
    return _phase_correlation(gray_THW[:-1], gray_THW[1:])


def action_error_px(
    frames: Any,
    actions: Sequence[int | str] | Any,
    cfg: ToyWorldConfig,
    exclude_objects: bool = True,
) -> float:
    """Mean over consecutive frame pairs of |measured shift - commanded shift| (Euclidean, px).

    The commanded content shift into frame t is minus the camera's move, ``-delta * speed_px``;
    frames that ignore the actions (frozen) score about ``speed_px`` on moving steps.
    ``exclude_objects`` as in ``frame_shifts``.
    """
    shifts_T2 = frame_shifts(frames, exclude_objects)
    offsets_T2 = camera_offsets(actions, cfg)
    if len(offsets_T2) != len(shifts_T2) + 1:
        raise ValueError(f"got {len(offsets_T2)} actions for {len(shifts_T2) + 1} frames")
    commanded_T2 = -np.diff(offsets_T2, axis=0)
    return float(np.linalg.norm(shifts_T2 - commanded_T2, axis=1).mean())


def _first_frame_source(
    actions: Sequence[int | str] | Any, cfg: ToyWorldConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Rows [T, H] and columns [T, W] of frame 0 that each pixel of frame t sees in the world.

    Taken on the torus to the representative nearest frame 0's view, so values in [0, H) mean
    "visible in frame 0" and anything else lies outside it.
    """
    offsets_T2 = camera_offsets(actions, cfg)
    f, m = cfg.frame_size, cfg.map_size
    half = m // 2 - f // 2
    pix_F = np.arange(f)
    rows_TH = (offsets_T2[:, :1] + pix_F + half) % m - half
    cols_TW = (offsets_T2[:, 1:] + pix_F + half) % m - half
    return rows_TH, cols_TW


def known_mask(actions: Sequence[int | str] | Any, cfg: ToyWorldConfig) -> np.ndarray:
    """bool [T, H, W]: pixels of frame t whose world location is visible in frame 0.

    Uses the camera motion only (the map is a torus, so coming back around counts); moving
    objects are not taken into account. Frame 0 is all True.
    """
    rows_TH, cols_TW = _first_frame_source(actions, cfg)
    f = cfg.frame_size
    rows_ok, cols_ok = (rows_TH >= 0) & (rows_TH < f), (cols_TW >= 0) & (cols_TW < f)
    return rows_ok[:, :, None] & cols_ok[:, None, :]


def ceiling_frames(
    first_frame: Any, actions: Sequence[int | str] | Any, cfg: ToyWorldConfig
) -> np.ndarray:
    """[T, H, W, C] (first_frame's dtype): frame 0 moved by the exact camera motion.

    Inside ``known_mask`` this equals the static ground truth exactly: the best any model can
    do from the first frame alone. Outside it, the nearest edge pixel of frame 0 is repeated.
    """
    frame_HWC = _to_numpy(first_frame, "first_frame")
    f = cfg.frame_size
    if frame_HWC.ndim != 3 or frame_HWC.shape[:2] != (f, f):
        raise ValueError(
            f"first_frame must be [{f}, {f}, C] for frame_size={f}, got shape {frame_HWC.shape}"
        )
    rows_TH, cols_TW = _first_frame_source(actions, cfg)
    rows_TH, cols_TW = np.clip(rows_TH, 0, f - 1), np.clip(cols_TW, 0, f - 1)
    return frame_HWC[rows_TH[:, :, None], cols_TW[:, None, :]]


def floor_frames(first_frame: Any, num_frames: int) -> np.ndarray:
    """[T, H, W, C]: the first frame repeated, the baseline of a model that ignores actions."""
    frame_HWC = _to_numpy(first_frame, "first_frame")
    if frame_HWC.ndim != 3:
        raise ValueError(f"first_frame must be [H, W, C], got shape {frame_HWC.shape}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return np.repeat(frame_HWC[None], num_frames, axis=0)
