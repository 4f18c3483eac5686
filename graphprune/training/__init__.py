"""Fine-tuning through onnxruntime-training (no torch): training graphs, losses, the loop, write-back.

The pass users call is ``graphprune.passes.finetune.FineTunePass``; this package holds its parts:
``ort_training`` (torch-free import), ``trainable`` (what trains, writing weights back), ``standins``
(differentiable forms of ops without gradients), ``masks`` (zeros that must stay zero), ``losses``,
``artifacts`` (training graph and session), ``loop`` and ``gradual`` (prune/fine-tune schedules).
"""

from graphprune.training.loop import TrainConfig
from graphprune.training.ort_training import ort_training

__all__ = ["TrainConfig", "ort_training"]
