"""Fine-tuning on plain onnxruntime: training graphs, losses, the loop, write-back.

The pass users call is ``graphprune.passes.finetune.FineTunePass``; this package holds its parts:
``trainable`` (what trains, writing weights back), ``masks`` (zeros that must stay zero), ``losses``,
``artifacts`` (the training graph and the session over graphprune's training-step model, built by
``graphprune.autodiff``), ``batchnorm`` (statistics re-estimation), ``loop`` and ``gradual``
(prune/fine-tune schedules).
"""

from graphprune.training.loop import TrainConfig

__all__ = ["TrainConfig"]
