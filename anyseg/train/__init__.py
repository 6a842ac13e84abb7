"""Training, fine-tuning and evaluation with SAM's interactive recipe (see docs/training.md).

Entry points: :class:`anyseg.train.trainer.Trainer` (with :class:`anyseg.train.config.TrainConfig`),
:func:`anyseg.train.evaluate.evaluate`, :func:`anyseg.train.datasets.open_dataset` and
:class:`anyseg.train.synthetic.SyntheticDataset`. Sub-modules are imported where used.
"""
