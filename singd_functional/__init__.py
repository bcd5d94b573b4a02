"""singd_functional: SINGD as a pure torch.func optimizer, plus a drop-in torch.optim face.

The data path, one module per stage::

    layers.py       find_layers(model)            which layers, described statically
    capture.py      make_capture(...)             inputs + output gradients via torch.func
    statistics.py   layer_statistics(...)         H_K, H_C
    factors.py      update_factors(...)           K, C, m_K, m_C
    precondition.py natural_gradient(...)         C C^T G K K^T
    transform.py    singd(...) -> (init, update)  the pure core: a chain of primitives
    guard.py        skip_nonfinite(tx)            a non-finite step changes nothing

Faces over that core: :class:`SINGD` (``optim.py``, a torch.optim.Optimizer) and the
vmapped sweeps (``sweep.py``).
"""

from . import _attention, _embedding, guard, structures  # noqa: F401 (registers kinds)
from ._official_compat import from_official_state_dict
from ._pytree import PYTREE_NAMESPACE
from .capture import LayerCapture, make_capture
from .combine import (
    GradientTransformation,
    apply_updates,
    chain,
    masked,
    partition,
    scale_by_schedule,
)
from .factors import Factors
from .fallbacks import (
    AdamWState,
    TraceState,
    adamw,
    add_decayed_weights,
    clip_by_global_norm,
    scale_by_learning_rate,
    sgd,
    trace,
)
from .guard import SkipNonfiniteState, skip_nonfinite
from .hyperparams import HyperParams
from .layers import LayerInfo, LayerKind, describe, find_layers, register_layer_kind
from .optim import SINGD
from .statistics import LayerStatistics
from .sweep import Step, Sweep, SweepState, grid, make_step, make_sweep
from .transform import KroneckerState, SINGDState, scale_by_kronecker_factors, singd

__version__ = "0.1.0"

__all__ = [
    "structures",
    "guard",
    "find_layers",
    "LayerInfo",
    "LayerKind",
    "register_layer_kind",
    "describe",
    "make_capture",
    "LayerCapture",
    "LayerStatistics",
    "Factors",
    "singd",
    "skip_nonfinite",
    "SkipNonfiniteState",
    "SINGD",
    "from_official_state_dict",
    "HyperParams",
    "SINGDState",
    "GradientTransformation",
    "apply_updates",
    "chain",
    "masked",
    "partition",
    "scale_by_kronecker_factors",
    "KroneckerState",
    "add_decayed_weights",
    "trace",
    "TraceState",
    "scale_by_learning_rate",
    "clip_by_global_norm",
    "scale_by_schedule",
    "sgd",
    "adamw",
    "AdamWState",
    "PYTREE_NAMESPACE",
    "make_step",
    "Step",
    "make_sweep",
    "grid",
    "Sweep",
    "SweepState",
]
