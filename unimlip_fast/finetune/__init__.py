"""Downstream fine-tuning from a pretraining run: chest X-ray classification (``classify``) and
medical VQA (``vqa``), their shared parts (``common``) and recipes (``config``). Their data sets are
read by :mod:`unimlip_fast.data.sources`, their metrics are :mod:`unimlip_fast.eval.metrics`."""
