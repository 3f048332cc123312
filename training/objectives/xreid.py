"""X-ReID's training objective: ID, triplet, CPCL and CMCL terms, plus the CPC prototype memories.

Term names and default weights follow the official code (docs/fidelity.md X14), which
differ from the paper's unit weights (Eq. 10):

| term | loss | weight |
|---|---|---|
| ``ce_clip``, ``ce_mii`` | CE on the clip-level logits | 0.25 each |
| ``tri_f``, ``tri_p``, ``tri_o`` | batch-hard triplet (margin 0.3) on f̄, p̄, ō | 1 each |
| ``cpcl_vis``, ``cpcl_ir`` | CPCL of every clip against each modality's memory | 1 each |
| ``ce_clip_frame``, ``ce_mii_frame`` | CE on the frame-level logits | weight x 1/T |
| ``cmcl`` | CMCL, summed over {SII, LII} x {visible, infrared} (paper only) | 1 |
| ``ce_cii``, ``tri_cii`` | CE / triplet on O_CII (the CII collapse guard; ours) | 0.25, 1 |

Terms of disabled parts are absent (not zero). ``ce_cii``/``tri_cii`` are the mean over the MII
branches present.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from vvireid.model.types import Modality
from vvireid.model.xreid import XReID, XReIDOutput
from vvireid.training.losses import (
    PrototypeMemory,
    batch_hard_triplet,
    cmcl_distances,
    cross_entropy,
    masked_mean,
)
from vvireid.training.objectives.base import Objective, TrainBatch

log = logging.getLogger(__name__)

TRIPLET_MARGIN = 0.3
_STATE_KEYS = {Modality.VISIBLE: "memory_vis", Modality.INFRARED: "memory_ir"}


class XReIDObjective(Objective):
    """Maps :class:`~model.xreid.XReIDOutput` to named, weighted loss terms; owns CPC's memories.

    CPC life cycle (per the official code): :meth:`on_epoch_start` rebuilds both memories from
    the current model in eval mode before every epoch; each step computes CPCL against the
    current memories; :meth:`after_backward` then moves each batch label's row toward its hardest
    sample (pool and momentum from the model's ``cpc_pool``/``cpc_momentum`` options).
    """

    WEIGHTS = {
        "ce_clip": 0.25,
        "ce_mii": 0.25,
        "tri_f": 1.0,
        "tri_p": 1.0,
        "tri_o": 1.0,
        "cpcl_vis": 1.0,
        "cpcl_ir": 1.0,
        "ce_clip_frame": 1.0,  # multiplied by 1/T
        "ce_mii_frame": 1.0,  # multiplied by 1/T
        "cmcl": 1.0,
        "ce_cii": 0.25,
        "tri_cii": 1.0,
    }

    def __init__(self, model: nn.Module, weights: dict[str, float] | None = None) -> None:
        super().__init__(model, weights)
        if not isinstance(model, XReID):
            raise TypeError(f"XReIDObjective needs an XReID model, got {type(model).__name__}")
        opts = model.opts
        self.seq_len = model.seq_len
        self.use_cpc = bool(opts["use_cpc"])
        self.momentum = float(opts["cpc_momentum"])
        self.pool = str(opts["cpc_pool"])
        self.cmcl_squared = bool(opts["cmcl_squared"])
        self.detach_cmcl_target = opts["cii_collapse_guard"] == "stopgrad"
        self.memories: dict[Modality, PrototypeMemory] = {}
        if self.use_cpc:
            device = next(model.parameters()).device
            temperature = float(opts["cpc_temperature"])
            for modality in Modality:
                memory = PrototypeMemory(model.config.num_classes, model.memory_dim, temperature)
                self.memories[modality] = memory.to(device)
        self.memories_ready = False

    @property
    def needs_epoch_pass(self) -> bool:
        return self.use_cpc

    # ---- loss ----------------------------------------------------------------------------------
    def __call__(self, out: XReIDOutput, batch: TrainBatch) -> dict[str, torch.Tensor]:
        pids, w = batch.pids, self.weights
        frame_pids = pids.repeat_interleave(self.seq_len)
        per_frame = 1.0 / self.seq_len
        terms = {
            "ce_clip": w["ce_clip"] * cross_entropy(out.logits_clip, pids),
            "tri_f": w["tri_f"] * batch_hard_triplet(out.f_mean, pids, TRIPLET_MARGIN),
            "tri_p": w["tri_p"] * batch_hard_triplet(out.p_mean, pids, TRIPLET_MARGIN),
            "ce_clip_frame": w["ce_clip_frame"]
            * per_frame
            * cross_entropy(out.logits_clip_frame, frame_pids),
        }
        if out.logits_mii is not None and out.logits_mii_frame is not None:
            assert out.o_mean is not None
            terms["ce_mii"] = w["ce_mii"] * cross_entropy(out.logits_mii, pids)
            terms["tri_o"] = w["tri_o"] * batch_hard_triplet(out.o_mean, pids, TRIPLET_MARGIN)
            terms["ce_mii_frame"] = (
                w["ce_mii_frame"] * per_frame * cross_entropy(out.logits_mii_frame, frame_pids)
            )
        if self.use_cpc:
            terms.update(self._cpcl_terms(out.memory_feat, pids))
        if out.cii:
            terms.update(self._cii_terms(out, batch))
        return terms

    def _cpcl_terms(self, memory_feat: torch.Tensor, pids: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.memories_ready:
            raise RuntimeError(
                "XReIDObjective: the CPC memories are empty; call on_epoch_start(model, batches) "
                "(or load_state_dict) before the first step"
            )
        terms = {}
        for modality, memory in self._memories_on(memory_feat.device).items():
            name = f"cpcl_{'vis' if modality is Modality.VISIBLE else 'ir'}"
            terms[name] = self.weights[name] * memory(memory_feat, pids)
        return terms

    def _cii_terms(self, out: XReIDOutput, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """CMCL over {branches} x {modalities}, and the CII supervision when the guard has it.

        With the "stopgrad" guard the CMCL target O_CII is detached: CMCL moves only the branch
        (SII/LII) toward the cross-modal feature, while CII learns from ``ce_cii``/``tri_cii``.
        CMCL is the mean within each modality, summed; the per-modality means are masked means
        (no boolean indexing, no ``bool(any)``), so the step never waits for the GPU here.
        """
        w, pids = self.weights, batch.pids
        rows = [batch.modalities == modality for modality in Modality]
        cmcl = out.cii[0].branch_mean.new_zeros(())
        for cii in out.cii:
            target = cii.interacted.detach() if self.detach_cmcl_target else cii.interacted
            distances = cmcl_distances(cii.branch_mean, target, self.cmcl_squared)
            for in_modality in rows:  # a modality absent from the batch adds 0
                cmcl = cmcl + masked_mean(distances, in_modality)
        terms = {"cmcl": w["cmcl"] * cmcl}
        supervised = [cii for cii in out.cii if cii.logits is not None]
        if supervised:
            ce = torch.stack([cross_entropy(cii.logits, pids) for cii in supervised]).mean()
            tri = torch.stack(
                [batch_hard_triplet(cii.interacted, pids, TRIPLET_MARGIN) for cii in supervised]
            ).mean()
            terms["ce_cii"] = w["ce_cii"] * ce
            terms["tri_cii"] = w["tri_cii"] * tri
        return terms

    # ---- CPC memories --------------------------------------------------------------------------
    def after_backward(self, out: XReIDOutput, batch: TrainBatch) -> None:
        """Hardest-sample momentum update of both memories (official ``CM_Hard.backward``).

        Pool "both": every clip of the label in the batch (code); "other": only the other
        modality's clips (paper Eq. 2), so a label without such clips keeps its row.
        """
        if not self.use_cpc:
            return
        for modality, memory in self._memories_on(out.memory_feat.device).items():
            candidates = None if self.pool == "both" else batch.modalities != modality
            memory.hardest_update(out.memory_feat, batch.pids, self.momentum, candidates)

    @torch.no_grad()
    def on_epoch_start(self, model: nn.Module, batches: Iterable[TrainBatch]) -> None:
        """Rebuild both memories from ``model`` in eval mode (official: every epoch).

        Each row is the L2-normalised mean of the memory features (no camera embedding) of that
        label's tracklets in the memory's modality. A label with no tracklet in one modality takes
        the other modality's prototype (the cross-modality update mixes the two anyway; a zero
        row would give that label a constant logit); a label absent from both keeps a zero row
        (cosine 0 with every feature) and is reported.
        """
        if not self.use_cpc:
            return
        if not isinstance(model, XReID):
            raise TypeError(f"on_epoch_start needs an XReID model, got {type(model).__name__}")
        feats, pids, modalities = self._memory_pass(model, batches)
        self._rebuild(feats, pids, modalities)

    @staticmethod
    def _memory_pass(
        model: XReID, batches: Iterable[TrainBatch]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = next(model.parameters()).device
        feats, pids, modalities = [], [], []
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                feats.append(model.memory_features(batch.clips.to(device)))
                pids.append(batch.pids.to(device))
                modalities.append(batch.modalities.to(device))
        finally:
            model.train(was_training)
        if not feats:
            raise ValueError("on_epoch_start: the memory pass got no training tracklets")
        return torch.cat(feats), torch.cat(pids), torch.cat(modalities)

    def _rebuild(self, feats: torch.Tensor, pids: torch.Tensor, modalities: torch.Tensor) -> None:
        memories = self._memories_on(feats.device)
        num_classes = memories[Modality.VISIBLE].num_classes
        present = {}
        for modality, memory in memories.items():
            rows = modalities == modality
            memory.features.zero_()
            if bool(rows.any()):
                memory.rebuild(feats[rows], pids[rows], missing="keep")
            present[modality] = torch.bincount(pids[rows].long(), minlength=num_classes) > 0
        rebuilt = {modality: memory.features.clone() for modality, memory in memories.items()}
        for modality, memory in memories.items():
            borrow = ~present[modality] & present[modality.other]
            memory.features[borrow] = rebuilt[modality.other][borrow]
            if bool(borrow.any()):
                log.warning(
                    "CPC: %d labels have no %s tracklet; their %s prototype is the %s one",
                    int(borrow.sum()),
                    modality.label,
                    modality.label,
                    modality.other.label,
                )
        absent = ~(present[Modality.VISIBLE] | present[Modality.INFRARED])
        if bool(absent.any()):
            log.warning(
                "CPC: %d of %d labels have no training tracklet", int(absent.sum()), num_classes
            )
        self.memories_ready = True
        log.info("CPC memories rebuilt from %d tracklets", feats.shape[0])

    def _memories_on(self, device: torch.device) -> dict[Modality, PrototypeMemory]:
        """The memories, moved to ``device`` when the model moved after this objective was built."""
        for memory in self.memories.values():
            if memory.features.device != device:
                memory.to(device)
        return self.memories

    # ---- resumable state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self.use_cpc:
            return {}
        state: dict[str, Any] = {"memories_ready": self.memories_ready}
        for modality, memory in self.memories.items():
            state[_STATE_KEYS[modality]] = memory.features.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.use_cpc:
            if state:
                raise ValueError("XReIDObjective without CPC has no state; got " + ", ".join(state))
            return
        for modality, memory in self.memories.items():
            key = _STATE_KEYS[modality]
            if key not in state:
                raise ValueError(f"XReIDObjective state lacks {key!r} (has: {', '.join(state)})")
            saved = torch.as_tensor(state[key])
            if saved.shape != memory.features.shape:
                raise ValueError(
                    f"XReIDObjective state {key!r} has shape {tuple(saved.shape)}, "
                    f"expected {tuple(memory.features.shape)} (num_classes x memory width)"
                )
            memory.features.copy_(saved.to(memory.features))
        self.memories_ready = bool(state.get("memories_ready", True))
