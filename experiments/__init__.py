"""Experiments built on rlhf_jax: the CPU demo (`python -m experiments.demo`), its report
generator (`experiments.report`), real-model pipelines (`python -m experiments.pipeline`,
configs in `experiments/configs/`) and the HH-RLHF converter (`experiments.prepare_hh`)."""
