"""The optimizer step as standard ONNX ops: torch.optim.AdamW and torch.optim.SGD.

`build_update` appends one optimizer step to the step model: it reads each trained
parameter, its gradient and its optimizer state (`state_slots`), and returns fresh
values for the updated parameters and states, which the caller wires to the graph
outputs ``<param>.updated`` and ``<slot>.updated``.

SGD follows torch's single-tensor implementation (``_single_tensor_sgd``; torch's
default on CPU) operation by operation, so the two differ only where torch's CPU
kernels fuse a multiply-add: a float32 ulp now and then. AdamW (``_single_tensor_adam``
with decoupled weight decay) computes the same update, rearranged to make fewer passes
over the parameter-sized tensors (its cost is memory traffic):

* **The AdamW state is kept pre-scaled.** Slot ``exp_avg`` holds M = m/(1 − β1) and
  ``exp_avg_sq`` holds V = v/(1 − β2), where m and v are torch's ``exp_avg`` and
  ``exp_avg_sq`` (multiply by 0.1 and 0.001 to get torch's). Then M' = β1·M + g and
  V' = β2·V + g·g (2 and 3 ops instead of 3 and 4), and the bias corrections, eps,
  1 − β1 and 1 − β2 fold into two per-step scalars:
  p' = p·decay + (M'·(−s))/(sqrt(V') + eps'), with s = lr·(1 − β1)/bc1 · bc2_sqrt/sqrt(1 − β2)
  and eps' = eps·bc2_sqrt/sqrt(1 − β2) (bc1 = 1 − β1^t, bc2_sqrt = sqrt(1 − β2^t)).
  The rounding order differs from torch's, so single elements differ by a few float32
  ulps (tests/test_onnx_optimizers.py still agrees at rtol 1e-6 of the tensor's scale).
  The runtime treats state as opaque tensors (zeros at the start, checkpointed and
  restored as they are), so only a reader of the checkpoint that expects torch's
  moments needs the scale factors; V ≥ 0 overflows to Inf at |g| ≥ 1.8e19 where torch's
  v would at 5.8e20.
* Everything that depends only on ``lr`` and ``step`` (decay factor, bias
  corrections, step size) is computed once per step on scalars, in float64 as
  torch does in Python, and rounded to float32 once, as torch rounds a Python
  scalar operand for a float32 kernel. Per parameter only full-tensor ops remain:
  AdamW 11 (10 without weight decay), SGD at most 6; one more when guarded (the
  ``Where`` on the gradient, below).
* Every scalar that meets a full parameter tensor is shaped ``[1]*rank`` (the
  parameter's rank): one ``Reshape`` of each computed scalar, one initializer of
  each constant, per distinct rank, shared by the parameters of that rank (see
  `_RankedScalars`). onnxruntime's CPU Mul/Add/Div of a tensor with trailing unit
  dims (a 1×1 conv weight ``[1280, 320, 1, 1]``) and a ``[]`` or ``[1]`` operand takes
  a per-element broadcast path, 50–100× slower than with a ``[1, 1, 1, 1]`` one.
  Broadcasting is exact, so the shapes change nothing in the numerics.
* torch.optim.SGD's first momentum step sets ``buf = g`` (a clone) instead of
  ``μ·buf + g``; here the momentum factor is a scalar ``Where(step == 1, 0, μ)``,
  which gives ``0·buf + g = g`` exactly provided the state enters step 1 finite
  (the runtime initializes every state slot to zeros).
* ``step`` is t, the 1-based index of this step, as a float32 scalar; ``lr`` the
  float32 learning rate of this step (already scheduled by the runtime).

In-place updates (the runtime binds each ``<name>.updated`` output to the buffer of
input ``<name>``, so onnxruntime overwrites the old state instead of allocating a
second copy of it) need two things of the step graph, both built here when
`build_update` is given the ``ok`` scalar of `build_guard`:

* **No state is written before it is read for the last time.** Every node that
  writes a state tensor (the last Add of each update) depends on ``ok``, and ``ok``
  depends on one element of every parameter gradient (`build_guard`), so no state
  is written before every gradient exists. Every other read of a state tensor is
  either a forward or backward node, which feeds the loss or some parameter's
  gradient, or an earlier node of the same update: all run before ``ok``. The
  writing node itself is elementwise (it reads element i of the old tensor and writes
  element i of the new one). `gfcompiler.onnx_step.step_model.in_place_hazards`
  checks the built graph for exactly this.
* **A non-finite loss leaves the state bit for bit unchanged** (there is no old copy
  to fall back to): ``ok`` is false when the loss is NaN or infinite, the gradients
  enter the update as ``Where(ok, g, 0)`` (one pass per parameter, as costly as about
  three Muls in onnxruntime's CPU kernels: a NaN gradient times a zero coefficient
  would still be NaN, so no cheaper gate will do), and the step's scalar coefficients
  become the identity's: AdamW's decay factor 1, β1 → 1, β2 → 1, step size s → 0
  (eps' stays positive), giving M·1 + 0 = M, V·1 + 0·0 = V and p·1 + (M·0)/denom = p;
  SGD's weight decay → 0, momentum → 1 and −lr → 0, giving buf·1 + (0 + p·0) = buf
  and p + buf·0 = p. The additions of ±0 are exact for every finite value
  except −0.0, which comes back as +0.0 (equal as numbers; a state that starts as
  +0.0 or nonzero never becomes −0.0 through these updates). With ``ok`` true every
  ``Where`` passes its first operand through, so the numbers equal the unguarded
  update's bit for bit.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from gfcompiler.artifacts import OPTIMIZERS, OptimizerSpec
from gfcompiler.emit import Emitter
from gfcompiler.errors import UnsupportedModelError

# torch.optim.AdamW defaults (amsgrad False, maximize False).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8

PHASE = "optimizer"


@dataclasses.dataclass(frozen=True)
class StateSlot:
    """One optimizer state tensor of one parameter (shape and dtype: the parameter's)."""

    param: str  # parameter name
    # "exp_avg" | "exp_avg_sq" | "momentum_buffer". AdamW's are torch's names, but hold its moments pre-scaled:
    # exp_avg/(1 − β1) and exp_avg_sq/(1 − β2) (module docstring); momentum_buffer is torch's as it is.
    kind: str
    name: str  # graph input name, f"{param}.{kind}"


def _kinds(spec: OptimizerSpec) -> tuple[str, ...]:
    if spec.name == "adamw":
        return ("exp_avg", "exp_avg_sq")
    if spec.name == "sgd":
        if not 0.0 <= spec.momentum < 1.0:
            raise UnsupportedModelError(f"--momentum must be in [0, 1), got {spec.momentum}")
        return ("momentum_buffer",) if spec.momentum > 0 else ()
    raise UnsupportedModelError(f"unknown optimizer {spec.name!r} (choose from {', '.join(OPTIMIZERS)})")


def state_slots(spec: OptimizerSpec, params: list[str]) -> list[StateSlot]:
    """The state tensors `build_update` reads and writes, parameter by parameter (all start as zeros)."""
    kinds = _kinds(spec)
    return [StateSlot(param, kind, f"{param}.{kind}") for param in params for kind in kinds]


def build_guard(e: Emitter, loss: ir.Value, grads: dict[str, ir.Value]) -> ir.Value:
    """``ok``: a bool scalar, true iff ``loss`` is finite, computed only after every gradient exists.

    The dependency on the gradients (the barrier of the in-place update, module
    docstring) costs no pass over them: one element of each gradient is sliced out
    (``Reshape`` to 1-D is a view in onnxruntime), and the result, ``not (count(isnan(probes))
    < 0)``, is always true, whatever the probed values (NaN and ±Inf included), but no
    optimizer can know that without running it. Nodes are named ``<prefix>/guard/...``.
    """
    if not grads:
        raise KeyError("no gradients to guard")
    ge = _child(e, "guard")
    scalar_loss = ge.op("Reshape", [loss, ge.ints("scalar_shape", [])], "loss")
    finite = ge.op("And", [ge.op("Not", [ge.op("IsNaN", [scalar_loss], "loss_is_nan")], "loss_not_nan"),
                           ge.op("Not", [ge.op("IsInf", [scalar_loss], "loss_is_inf")], "loss_not_inf")], "loss_is_finite")
    flat, start, end = ge.ints("flat_shape", [-1]), ge.ints("probe_start", [0]), ge.ints("probe_end", [1])
    probes = [ge.op("Slice", [ge.op("Reshape", [g, flat], f"{name}/grad_flat"), start, end], f"{name}/grad_probe")
              for name, g in grads.items()]
    probe = probes[0] if len(probes) == 1 else ge.op("Concat", probes, "grad_probes", axis=0)
    flags = ge.op("Cast", [ge.op("IsNaN", [probe], "grad_probes_nan")], "grad_probes_nan_f32", to=ir.DataType.FLOAT)
    count = ge.op("ReduceSum", [flags], "grad_probes_nan_count", keepdims=0)  # finite, in [0, len(grads)]
    after_gradients = ge.op("Not", [ge.op("Less", [count, ge.scalar("zero", 0.0)], "grad_probes_negative")],
                            "after_gradients")  # always true
    ok = ge.op("And", [finite, after_gradients], "ok")
    ok.dtype, ok.shape = ir.DataType.BOOL, ir.Shape([])
    return ok


def build_update(e: Emitter, spec: OptimizerSpec, params: dict[str, ir.Value], grads: dict[str, ir.Value],
                 state: dict[str, ir.Value], lr: ir.Value, step: ir.Value,
                 ok: ir.Value | None = None) -> tuple[dict[str, ir.Value], dict[str, ir.Value]]:
    """Emit one optimizer step; returns (updated params by param name, updated state by slot name).

    ``params``/``grads`` are keyed by parameter name, ``state`` by `StateSlot.name`
    (exactly `state_slots`); ``lr`` and ``step`` are float32 scalars. ``ok`` (a bool
    scalar, from `build_guard`) guards the update for in-place execution: every state
    write waits for it, and where it is false the update is exactly the identity
    (module docstring); without it the update is the plain one. Shared scalar ops are
    named ``<prefix>/<optimizer>/...``, per-parameter ones
    ``<prefix>/<param>/<optimizer>/...`` (``<prefix>``: ``e``'s, when set).
    """
    kinds = _kinds(spec)
    missing = [name for name in params if name not in grads]
    if missing:
        raise KeyError(f"no gradient for parameters {missing}")
    wd = float(spec.effective_weight_decay)
    shared = _child(e, spec.name)

    def gated(name: str, value: float | ir.Value | None, identity: float) -> float | ir.Value | None:
        """``value`` where ``ok``, else ``identity`` (a float32 scalar); unchanged without ``ok``."""
        if ok is None or value is None:
            return value
        if not isinstance(value, ir.Value):
            value = shared.scalar(f"{name}_value", value)
        return shared.op("Where", [ok, value, shared.scalar(f"{name}_identity", identity)], f"{name}_guarded")

    guard = {} if ok is None else {"ok": ok, "zero": 0.0}

    def guarded_grad(pe: Emitter, s: dict, g: ir.Value) -> ir.Value:
        return g if ok is None else pe.op("Where", [s["ok"], g, s["zero"]], "grad_guarded")

    lr64 = shared.op("Cast", [lr], "lr_f64", to=ir.DataType.DOUBLE)
    new_params: dict[str, ir.Value] = {}
    new_state: dict[str, ir.Value] = {}
    if spec.name == "adamw":
        beta1, beta2 = ADAM_BETAS
        one = shared.scalar("one", 1.0, np.float64)
        step64 = shared.op("Cast", [step], "step_f64", to=ir.DataType.DOUBLE)
        # The state is kept pre-scaled (module docstring): M = m/(1 − β1), V = v/(1 − β2), so that
        # M' = β1·M + g, V' = β2·V + g·g, and torch's p·decay − step_size·m/(sqrt(v)/bc2_sqrt + eps)
        # becomes p·decay + (M'·(−s))/(sqrt(V') + eps') with, in float64 per step,
        # s = lr·(1 − β1)/bc1 · bc2_sqrt/sqrt(1 − β2) and eps' = eps·bc2_sqrt/sqrt(1 − β2).
        bc1 = shared.op("Sub", [one, shared.op("Pow", [shared.scalar("beta1", beta1, np.float64), step64], "beta1_pow")],
                        "bias_correction1")
        bc2 = shared.op("Sub", [one, shared.op("Pow", [shared.scalar("beta2", beta2, np.float64), step64], "beta2_pow")],
                        "bias_correction2")
        # bc2_sqrt/sqrt(1 − β2), in float64
        v_scale = shared.op("Div", [shared.op("Sqrt", [bc2], "bias_correction2_sqrt_f64"),
                                    shared.scalar("sqrt_one_minus_beta2", float(np.sqrt(1 - beta2)), np.float64)],
                            "v_scale_f64")
        step_size = shared.op("Mul", [shared.op("Div", [lr64, bc1], "step_size_f64"), v_scale], "scaled_step_size_f64")
        neg_step_size = _f32(shared, shared.op("Neg", [shared.op("Mul", [step_size, shared.scalar("one_minus_beta1", 1 - beta1,
                                                                                                  np.float64)],
                                                                 "m_step_size_f64")], "neg_step_size_f64"), "neg_step_size")
        eps = _f32(shared, shared.op("Mul", [v_scale, shared.scalar("eps", ADAM_EPS, np.float64)], "eps_f64"), "eps")
        decay = None
        if wd != 0:
            decay = _f32(shared, shared.op("Sub", [one, shared.op("Mul", [lr64, shared.scalar("wd", wd, np.float64)], "lr_wd")],
                                           "decay_f64"), "decay")
        # Guarded (``ok`` false): decay 1, β1 → 1, β2 → 1, step size 0 (eps' stays > 0: (M·0)/denom = 0).
        scalars = _RankedScalars(shared, {"beta1_f32": gated("beta1", beta1, 1.0), "beta2_f32": gated("beta2", beta2, 1.0),
                                          "eps": eps, "decay": gated("decay", decay, 1.0),
                                          "neg_step_size": gated("neg_step_size", neg_step_size, 0.0), **guard})
        for name, p in params.items():
            pe = _child(e, f"{name}/adamw")
            s = scalars.at(_rank(p))
            beta1_32, beta2_32, eps, decay, neg_step_size = (s["beta1_f32"], s["beta2_f32"], s["eps"], s["decay"],
                                                             s["neg_step_size"])
            g, m, v = guarded_grad(pe, s, grads[name]), state[f"{name}.exp_avg"], state[f"{name}.exp_avg_sq"]
            if decay is not None:
                p = pe.op("Mul", [p, decay], "decayed")  # param.mul_(1 - lr*wd)
            # Emission order (the numbers do not depend on it): onnxruntime's default execution order is a
            # depth-first walk from the outputs that computes, of a node's inputs, the one made by the
            # later-emitted node first, which keeps few parameter-sized temporaries alive at once.
            m = pe.op("Add", [pe.op("Mul", [m, beta1_32], "m_scaled"), g], "exp_avg")  # M' = β1·M + g
            v = pe.op("Add", [pe.op("Mul", [v, beta2_32], "v_scaled"), pe.op("Mul", [g, g], "g_sq")],
                      "exp_avg_sq")  # V' = β2·V + g·g
            denom = pe.op("Add", [pe.op("Sqrt", [v], "v_sqrt"), eps], "denom")
            # (M'·(−s))/denom: with s = 0 (ok false) that is 0/denom = 0 even where M'/denom would overflow
            delta = pe.op("Div", [pe.op("Mul", [m, neg_step_size], "m_step"), denom], "delta")
            new_params[name] = _like(pe.op("Add", [p, delta], "param"), params[name])
            new_state[f"{name}.exp_avg"] = _like(m, params[name])
            new_state[f"{name}.exp_avg_sq"] = _like(v, params[name])
        return new_params, new_state

    # SGD (dampening 0, nesterov False): g += wd·p; buf = μ·buf + g (buf = g on step 1); p += (−lr)·buf.
    neg_lr = _f32(shared, shared.op("Neg", [lr64], "neg_lr_f64"), "neg_lr")
    momentum = None
    if kinds:
        first = shared.op("Equal", [step, shared.scalar("one", 1.0)], "first_step")
        momentum = shared.op("Where", [first, shared.scalar("zero", 0.0), shared.scalar("momentum_f32", spec.momentum)],
                             "momentum")
    # Guarded (``ok`` false): −lr → 0, weight decay 0, momentum 1.
    scalars = _RankedScalars(shared, {"neg_lr": gated("neg_lr", neg_lr, 0.0), "wd": gated("wd", wd if wd != 0 else None, 0.0),
                                      "momentum": gated("momentum", momentum, 1.0), **guard})
    for name, p in params.items():
        pe = _child(e, f"{name}/sgd")
        s = scalars.at(_rank(p))
        wd32, momentum, neg_lr = s["wd"], s["momentum"], s["neg_lr"]
        g = guarded_grad(pe, s, grads[name])
        if wd32 is not None:
            g = pe.op("Add", [g, pe.op("Mul", [p, wd32], "p_wd")], "grad_decayed")  # grad.add(param, alpha=wd)
        if momentum is not None:
            slot = f"{name}.momentum_buffer"
            g = pe.op("Add", [pe.op("Mul", [state[slot], momentum], "buf_scaled"), g], "momentum_buffer")
            new_state[slot] = _like(g, params[name])
        new_params[name] = _like(pe.op("Add", [p, pe.op("Mul", [g, neg_lr], "delta")], "param"), params[name])
    return new_params, new_state


class _RankedScalars:
    """The optimizer's shared scalars, each shaped ``[1]*rank`` for the parameters of one rank.

    ``scalars`` maps a name to a float (a float32 constant), a scalar value of the
    graph (computed per step: float32, or the bool ``ok``) or None (absent). `at` gives them at ``rank``: the
    constants as initializers of that shape, the computed values through one
    ``Reshape`` each, made on first use of a rank and shared by every later parameter
    of it (rank None, unknown: the ``[]`` scalars themselves).
    """

    def __init__(self, e: Emitter, scalars: dict[str, float | ir.Value | None]) -> None:
        self.e = e
        self.scalars = scalars
        self.ranks: dict[int | None, dict[str, ir.Value | None]] = {}

    def at(self, rank: int | None) -> dict[str, ir.Value | None]:
        if rank not in self.ranks:
            shape = None if rank is None else [1] * rank
            suffix = "" if rank is None else f"_rank{rank}"
            target = None if rank in (None, 0) else self.e.ints(f"scalar_shape{suffix}", shape)
            ranked: dict[str, ir.Value | None] = {}
            for name, value in self.scalars.items():
                if value is None:
                    ranked[name] = None
                elif not isinstance(value, ir.Value):
                    array = np.asarray(value, dtype=np.float32)
                    ranked[name] = self.e.const(f"{name}{suffix}", array if shape is None else array.reshape(shape))
                else:
                    ranked[name] = value if target is None else self.e.op("Reshape", [value, target], f"{name}{suffix}")
            self.ranks[rank] = ranked
        return self.ranks[rank]


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _child(e: Emitter, name: str) -> Emitter:
    return e.child(f"{e.prefix}/{name}" if e.prefix else name, phase=PHASE)


def _f32(e: Emitter, value: ir.Value, name: str) -> ir.Value:
    return e.op("Cast", [value], name, to=ir.DataType.FLOAT)


def _like(value: ir.Value, param: ir.Value) -> ir.Value:
    """``value`` typed and shaped as ``param`` (where known), for the caller's graph outputs."""
    if param.type is not None:
        value.type = param.type
    if param.shape is not None:
        value.shape = param.shape
    return value
