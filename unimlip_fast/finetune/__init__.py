"""Downstream fine-tuning from a pretraining run: chest X-ray classification (``classify``) and
medical VQA (``vqa``), their data readers (``readers``), metrics (``metrics``) and recipes (``config``)."""
