"""HF transformers experts backend: ``experts_implementation="fused_moe_ops"``.

    import fused_moe_ops                                   # registers the backend, lazily
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="fused_moe_ops")
    model.set_experts_implementation("fused_moe_ops")     # or switch a loaded model

transformers >= 5.7 dispatches every ``@use_experts_implementation`` experts module through
``transformers.integrations.moe.ExpertsInterface``. ``experts_forward`` below is transformers'
``grouped_mm`` forward (sort the token-slots by expert, two grouped GEMMs with the module's own
gate, bias, layout and post-expert norm) ending in one ``moe::shuffle_mul_sum`` instead of
grouped_mm's weight multiply, inverse-permutation gather and ``view(T, topk, H).sum(1)``: the op
reads the expert-sorted rows through the inverse permutation, weights them by ``top_k_weights``
as they are (no sorted copy) and sums in float32. Expert-parallel placeholders (ids >=
num_experts, weight 0) become -1 entries, which the op skips (their rows are never read).

The module's features are read as the installed release defines them, by what it has (no version
test): the attributes every release from 5.7 sets (``has_gate``, ``has_bias``, ``is_transposed``,
``_apply_gate``) always; the expert-parallel mark ``_is_expert_parallel`` (5.18 on: placeholders
only in marked modules; before, in every call, as that release's grouped_mm masks them) and
``has_post_expert_norm`` (5.20 on; before, no such step) where the module has them.
scripts/transformers_versions.py runs tests/test_hf_backend.py under each release.

Where the op cannot serve, the call is grouped_mm's own forward:
- autograd needs the graph (grad mode on and a weight or input requires grad): the op has no
  backward. Said once on the ``fused_moe_ops`` logger; run under ``torch.inference_mode()`` or
  ``torch.no_grad()`` (``generate()`` does).
- under ``torch.compile``: the fusion pass rewrites grouped_mm's combine into the op and Inductor
  then times the op against its own code (fusion/autotune.py), so the compiled model gets exactly
  the graph and the choice that grouped_mm compiled with the pass gets. (transformers 5.7 to 5.16
  zero the placeholder rows after the weight multiply, a combine the pass does not rewrite: there
  the compiled model is grouped_mm's, unfused.)

``import fused_moe_ops`` does not import transformers: ``register_when_imported()`` registers the
backend when ``transformers.integrations.moe`` is imported (at once if it already is). With
transformers older than 5.7, or without it, nothing is registered, nothing fails and models run
their own experts implementation; ``state()`` says which (``python -m fused_moe_ops`` prints it).
5.7 is the first release whose models accept an experts implementation registered in
``ExpertsInterface``: 5.6 has the interface but ``experts_implementation`` takes only eager,
grouped_mm, batched_mm and deepgemm (a ValueError for any other name).
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Optional

import torch

from .._import_hook import AfterImportHook, call_after_import

NAME = "fused_moe_ops"
MIN_TRANSFORMERS = (5, 7)
MOE_MODULE = "transformers.integrations.moe"

log = logging.getLogger("fused_moe_ops")

_STATE = {"registered": False, "reason": "transformers not imported yet"}
_HOOK: Optional[AfterImportHook] = None
_warned_grad = False


def _parse_version(version: str) -> tuple:
    """(major, minor) of "5.7.0", "5.8.0.dev0", "2.14.1+cu130"."""
    return tuple(int(n) for n in re.findall(r"\d+", version)[:2])


def _needs_autograd(self, hidden_states: torch.Tensor, top_k_weights: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    if hidden_states.requires_grad or top_k_weights.requires_grad or self.down_proj.requires_grad:
        return True
    up = self.gate_up_proj if self.has_gate else self.up_proj
    return up.requires_grad


def _grouped_mm_forward(self, hidden_states, top_k_index, top_k_weights):
    from transformers.integrations.moe import grouped_mm_experts_forward

    return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts forward registered as ``"fused_moe_ops"``: ``(T, H), (T, topk), (T, topk) -> (T, H)``."""
    if torch.compiler.is_compiling():
        return _grouped_mm_forward(self, hidden_states, top_k_index, top_k_weights)
    if _needs_autograd(self, hidden_states, top_k_weights):
        global _warned_grad
        if not _warned_grad:
            _warned_grad = True
            log.warning("fused_moe_ops experts: grad mode is on and the experts' weights or inputs require grad; "
                        "running transformers' grouped_mm forward (moe::shuffle_mul_sum has no backward). Run "
                        "under torch.inference_mode() or torch.no_grad() to use the fused combine.")
        return _grouped_mm_forward(self, hidden_states, top_k_index, top_k_weights)
    return _fused_forward(self, hidden_states, top_k_index, top_k_weights)


# One path at every token count. A decode path that ran the GEMMs batched in slot order (each slot's
# expert weights gathered, no sort) measured 0.57x grouped_mm at 1 token on an idle 2-core Xeon (bf16,
# hidden 1024, 64 experts, top-8: the weight gather dominates), where this path is 1.00x.
def _fused_forward(self, hidden_states, top_k_index, top_k_weights):
    # Mirrors transformers' grouped_mm_experts_forward up to the down projection (same GEMM helper,
    # same offsets); the combine is the op. The module's optional features are read as the installed
    # release defines them: an attribute the release does not set is a feature it does not have
    # (_placeholders_possible, _post_expert_norm).
    from transformers.integrations.moe import _grouped_linear

    num_top_k = top_k_index.size(-1)
    expert_ids = top_k_index.reshape(-1)  # (S,), S = tokens * top_k

    # Sort the slots by expert: perm[r] is the slot whose row r of the grouped buffer holds.
    expert_ids_g, perm = torch.sort(expert_ids)
    selected_hidden_states_g = hidden_states[perm // num_top_k]

    # Offsets for grouped_mm. histc, as grouped_mm does (CUDA-graph safe); on CPU / MPS it takes floats.
    histc_input = expert_ids_g.float() if hidden_states.device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)

    # Expert-parallel placeholders (ids >= num_experts) sort to the tail, histc leaves them out of the
    # offsets and the GEMMs skip their rows (left uninitialized). Clamp only for the bias gather; their
    # slots become -1 below, so the op never reads those rows: each release's grouped_mm gives them a
    # zero contribution too.
    placeholders = None
    if _placeholders_possible(self):
        placeholders = expert_ids >= self.num_experts
        expert_ids_g = expert_ids_g.clamp(max=self.num_experts - 1)

    if self.has_gate:
        up_weights = self.gate_up_proj
        up_biases = self.gate_up_proj_bias[expert_ids_g] if self.has_bias else None
    else:
        up_weights = self.up_proj
        up_biases = self.up_proj_bias[expert_ids_g] if self.has_bias else None
    proj_out = _grouped_linear(selected_hidden_states_g, up_weights, offsets, bias=up_biases,
                               is_transposed=self.is_transposed)
    proj_out = self._apply_gate(proj_out) if self.has_gate else self.act_fn(proj_out)
    down_biases = self.down_proj_bias[expert_ids_g] if self.has_bias else None
    proj_out = _grouped_linear(proj_out, self.down_proj, offsets, bias=down_biases,
                               is_transposed=self.is_transposed)
    if _post_expert_norm(self):
        proj_out = self.post_expert_norm(proj_out)

    # slot -> its row of proj_out: the inverse of perm.
    rows_of_slots = torch.empty_like(perm)
    rows_of_slots[perm] = torch.arange(perm.size(0), device=perm.device)
    if placeholders is not None:
        rows_of_slots = rows_of_slots.masked_fill(placeholders, -1)
    return torch.ops.moe.shuffle_mul_sum(proj_out, rows_of_slots, top_k_weights, hidden_states.dtype)


def _placeholders_possible(self) -> bool:
    """Whether ids >= num_experts are expert-parallel placeholders here. transformers >= 5.18 marks
    expert-parallel modules (``_is_expert_parallel``) and its grouped_mm masks placeholders only in
    those; releases without the attribute (5.7 to 5.17) mask them in every call, so we do too."""
    return getattr(self, "_is_expert_parallel", True)


def _post_expert_norm(self) -> bool:
    """Whether the module applies ``post_expert_norm`` to each expert's output (transformers >= 5.20
    sets ``has_post_expert_norm``; before, its grouped_mm has no such step)."""
    return getattr(self, "has_post_expert_norm", False)


# --- registration ----------------------------------------------------------------------------------

def register() -> bool:
    """Register ``experts_forward`` as ``"fused_moe_ops"`` in transformers' ExpertsInterface (the
    mapping ``from_pretrained`` validates against and every ``@use_experts_implementation`` module
    dispatches through). Returns whether it is registered; ``state()`` says why not."""
    import transformers

    version = getattr(transformers, "__version__", "0")
    if _parse_version(version) < MIN_TRANSFORMERS:
        _STATE.update(registered=False, reason=_too_old(version))
        return False
    try:
        # The GEMM helpers are transformers' own (private, present since the interface came).
        from transformers.integrations.moe import ExpertsInterface, _grouped_linear  # noqa: F401
    except ImportError as e:
        _STATE.update(registered=False, reason=f"transformers {version}: {e}")
        return False
    ExpertsInterface.register(NAME, experts_forward)
    _STATE.update(registered=True, reason=f"registered in transformers {version}")
    log.debug("fused_moe_ops: experts_implementation=%r registered in transformers %s", NAME, version)
    return True


def register_when_imported() -> None:
    """Register now if transformers' experts interface is imported, else right after it is."""
    global _HOOK
    if _HOOK is not None and _HOOK.pending():
        return
    _HOOK = call_after_import(MOE_MODULE, register)


def state() -> dict:
    """``{"registered": bool, "reason": str, "pending": bool, "will_register": bool}``, without
    importing transformers. pending: the import hook waits; will_register: and the installed
    transformers is recent enough."""
    info = dict(_STATE)
    info["pending"] = _HOOK is not None and _HOOK.pending()
    info["will_register"] = False
    if not info["registered"] and info["pending"]:
        version = _installed_version()
        if version is None:
            info["reason"] = "transformers is not installed"
        elif _parse_version(version) < MIN_TRANSFORMERS:
            info["reason"] = _too_old(version)
        else:
            info["will_register"] = True
            info["reason"] = f"transformers {version} installed; registers when its experts interface is imported"
    return info


def _too_old(version: str) -> str:
    floor = ".".join(map(str, MIN_TRANSFORMERS))
    return (f"transformers {version} < {floor}: its models accept only their built-in experts implementations "
            f"(from {floor} on, any registered in its ExpertsInterface); models run their own")


def _installed_version() -> Optional[str]:
    """The installed transformers' version, read from its metadata (no import); None if absent."""
    module = sys.modules.get("transformers", False)
    if module is None:  # an import of it failed, or was blocked
        return None
    if module is not False:
        return getattr(module, "__version__", "0")
    from importlib import metadata

    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None
