"""Test-time distillation (docs/method.md, steps 0, 1, 4-8).

Submodules (import them directly; this package imports nothing so ``losses`` stays light):

* ``losses``: ``kd_kl``, ``kd_loss``, ``soft_target_cross_entropy`` (pure functions of logits).
* ``cache``: the one-time pseudo-label cache — ``select_subset``, ``build_cache``,
  ``PseudoLabelCache``, ``key_for``, ``save``/``load`` (key-checked), ``load_or_build``.
* ``finetune``: ``make_kd_step`` (cached logits), ``make_online_kd_step`` (teacher every batch),
  ``kd_optimizer``, ``init_state``/``KDState``, ``finetune`` (loop with seeded data order,
  progress lines and orbax resume).
* ``bn_adapt``: ``adapt_batch_stats`` / ``make_bn_adapter`` (adaptive BN, exact average over k
  batches), ``teacher_bn_adapt`` (test-time BN adaptation of the teacher).
* ``distributed``: ``initialize(enabled)`` for multi-host runs.
"""
