"""EPSD: early pruning (at initialisation) with self-distillation, and its baselines.

Chen et al., "EPSD: Early Pruning with Self-Distillation for Efficient Model Compression"
(arXiv 2402.00084): prune the network at initialisation keeping the weights most salient for the
self-distillation (SD) objective, then train the sparse network with SD. Our formulation (design
choices, all pluggable):

* ``saliency``: SNIP's cross-entropy objective and EPSD's SD objective (labels mixed with the
  network's own temperature-softened, stop-gradient predictions), both scored as
  |w ⊙ ∂L/∂w| through ``pruning.unstructured.gradient_saliency``.
* ``training``: training with masks held fixed; SD = progressive self-knowledge distillation
  (PS-KD): targets mix the label with the network's own predictions from the previous epoch,
  with a weight growing linearly to α_T.
* ``experiment``: the method registry (dense, random, magnitude, SNIP, EPSD; with/without SD),
  the sweep over sparsities and seeds, the report and the accuracy-vs-sparsity plot.
"""

from ttmpd_jax.epsd.experiment import (DEFAULT_METHODS, DEFAULT_SPARSITIES, METHODS, EPSDConfig,
                                       Method, run_sweep)
from ttmpd_jax.epsd.saliency import (CrossEntropyObjective, SelfDistillationObjective,
                                     ce_objective, sd_objective)
from ttmpd_jax.epsd.training import masked_train_step, pskd_alpha, train_masked

__all__ = ['DEFAULT_METHODS', 'DEFAULT_SPARSITIES', 'METHODS', 'EPSDConfig', 'Method',
           'run_sweep', 'CrossEntropyObjective', 'SelfDistillationObjective', 'ce_objective',
           'sd_objective', 'masked_train_step', 'pskd_alpha', 'train_masked']
