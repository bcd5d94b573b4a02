"""The drop-in face's loss-scale handling (``torch.amp.GradScaler``, hand-scaled losses).

``SINGD`` declares ``_step_supports_amp_scaling``, so ``scaler.step(opt)`` sets
``opt.grad_scale`` (the scale the gradients carry; None after ``scaler.unscale_(opt)``)
and ``opt.found_inf`` before calling ``step`` and removes both after. The recorded
output gradients dL/dz always carry the scale of the backward pass. After
``scaler.unscale_(opt)`` the gradients are unscaled in place and the scale the
statistics carry cannot be known by the optimizer: the training loop must then give it
with ``opt.set_current_grad_scale(scaler.get_scale())`` (as the official package
requires). :func:`scales` raises before anything changes when it is missing.
"""

from __future__ import annotations

from torch import Tensor

UNSCALED_WITHOUT_SCALE = (
    "SINGD.step: scaler.unscale_(opt) removed the loss scale from the gradients, but the "
    "recorded layer output gradients still carry it and the optimizer cannot know it; "
    "add the line\n    opt.set_current_grad_scale(scaler.get_scale())\nbefore "
    "scaler.step(opt) (after scaler.unscale_(opt), every step)"
)


def found_inf(optimizer) -> Tensor | None:
    """GradScaler's verdict on the gradients (a device tensor, > 0: non-finite), if any.

    Never read on the host: the step folds it into its own decision (``guard``), so
    GradScaler's own device-side check is not turned back into a synchronisation.
    """
    return getattr(optimizer, "found_inf", None)


def scales(optimizer, statistics_due: bool) -> tuple[float | Tensor, float | Tensor | None]:
    """(scale the gradients carry, scale the recorded output gradients carry).

    The second is None when statistics are not due (nothing recorded). Raises, before
    anything changes, when statistics are due after ``scaler.unscale_(opt)`` and the
    scale was not given with ``set_current_grad_scale``.
    """
    explicit = optimizer._explicit_grad_scale
    if getattr(optimizer, "found_inf", None) is None:  # no GradScaler.step around us
        s = 1.0 if explicit is None else explicit
        return s, s if statistics_due else None
    scale = getattr(optimizer, "grad_scale", None)
    if scale is not None:  # GradScaler did not unscale: both carry its scale
        # no init_grad_scale check here: GradScaler's scale is a device tensor, and
        # reading it would wait for the device (set_current_grad_scale checks a number)
        return scale, scale if statistics_due else None
    # scaler.unscale_(opt) divided p.grad in place; dL/dz still carries the scale
    if statistics_due and explicit is None:
        raise RuntimeError(UNSCALED_WITHOUT_SCALE)
    return 1.0, explicit if statistics_due else None
